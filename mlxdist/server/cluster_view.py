"""`GET /v1/cluster`: the engine's layout, memory, live numbers and events as one JSON
object (docs/console.md), for the web console and `mlxdist cluster --url`."""

from __future__ import annotations

import time
from typing import Any

from mlxdist.runtime.api import Layout, engine_events, engine_health, engine_layout


def snapshot(engine: Any, live: dict[str, Any]) -> dict[str, Any]:
    from mlxdist.cluster import machine  # this machine, probed as `mlxdist node` probes it

    layout: Layout = engine_layout(engine)
    kv0 = float(_stats(engine).get("kv_bytes") or 0)
    layers0 = next((st.end - st.start for st in layout.stages if st.rank == 0), 0)
    nodes = []
    for n in layout.nodes:
        mine = [st for st in layout.stages if st.node == n.name]
        total, free, chip = n.memory_total, n.memory_free, n.chip
        if layout.mode != "nodes":  # this machine
            total, free = machine.memory_total(), machine.memory_available()
            chip = chip or machine.chip_name()
        # rank 0 measures its caches; the others hold the same sequences over their layers
        kv = int(sum(kv0 * (st.end - st.start) / layers0 for st in mine)) if layers0 else None
        nodes.append({"name": n.name, "host": n.host, "chip": chip, "health": n.health,
                      "memory": {"total": total, "weights": sum(st.weight_bytes for st in mine) or None,
                                 "kv_cache": kv, "free": free},
                      "links": [{"to": to, "kind": kind} for to, kind in n.links],
                      "ranks": [st.rank for st in mine]})
    stages = [{"rank": st.rank, "node": st.node, "layers": [st.start, st.end], "weight_bytes": st.weight_bytes,
               "experts": None if st.experts is None else {"owned": list(st.experts), "total": st.total_experts}}
              for st in layout.stages]
    return {"model": engine.model_name, "mode": layout.mode, "num_layers": layout.num_layers,
            "nodes": nodes, "stages": stages, **live_update(engine, live)}


def live_update(engine: Any, live: dict[str, Any]) -> dict[str, Any]:
    """What the event stream sends each second: live numbers, health, events."""
    stats = _stats(engine)
    h = engine_health(engine)
    return {"live": {**live, "prefix_cache_hit_tokens": int(stats.get("reused_tokens") or 0),
                     "requests_total": int(stats.get("requests_total") or 0)},
            "health": {"status": h.status, "reason": h.reason}, "events": engine_events(engine)[-50:],
            "time": time.time()}


def _stats(engine: Any) -> dict[str, Any]:
    try:
        return dict(engine.stats())
    except Exception:
        return {}
