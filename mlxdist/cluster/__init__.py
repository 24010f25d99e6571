"""cluster: discovery, the authenticated control plane, shard delivery, launch, health."""


def placement_nodes(browse_s: float = 2.0):  # -> list[mlxdist.placement.hardware.NodeSpec]
    """The healthy nodes of the live cluster, for the planner (`mlxdist plan --nodes auto`).
    Imported lazily: `import mlxdist.cluster` stays cheap."""
    from mlxdist.cluster.inventory import placement_nodes as discover

    return discover(browse_s)
