"""cluster: discovery, the authenticated control plane, shard delivery, launch, health."""
