"""The plan as people read it: a table per node and the estimate, and a note when the
nodes are not the Apple GPUs the cost model prices."""

from __future__ import annotations

from mlxdist.errors import plural
from mlxdist.placement.specs import CHIPS, GB
from mlxdist.placement.plan import Plan


def format_table(p: Plan) -> str:
    rows = [("rank", "node", "chip", "layers", "experts/layer", "weights GB", "KV GB", "% usable", "ms/step")]
    for ld in p.loads:
        layers = ", ".join(f"{a}-{b - 1}" for a, b in ld.layers)
        rows.append((str(p.group.index(ld.node)), ld.node, ld.chip, layers, str(ld.n_experts),
                     f"{ld.weight_bytes / GB:.1f}", f"{ld.kv_bytes / GB:.1f}", f"{100 * ld.fraction:.0f}%",
                     f"{ld.busy_ms_per_step:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    e = p.estimate
    total_w = sum(ld.weight_bytes for ld in p.loads) / GB
    total_kv = sum(ld.kv_bytes for ld in p.loads) / GB
    lines += [
        "",
        f"model {p.model} ({p.model_type}) at {p.bits} bits, context {p.context} x "
        f"{plural(p.concurrency, 'request')}, links {p.link}",
        f"strategy: {_strategy(p)}; memory: {total_w:.1f} GB weights + {total_kv:.1f} GB KV cache in all",
        f"decode: {e.decode_ms_per_token:.1f} ms/token alone ({e.decode_tok_s:.1f} tok/s, "
        f"{e.comm_ms_per_token:.2f} ms of it on links); {e.aggregate_tok_s:.1f} tok/s over "
        f"{plural(p.concurrency, 'request')} ({e.step_ms_at_concurrency:.1f} ms/token each); "
        f"prefill ~{e.prefill_tok_s:.0f} tok/s",
        f"why: {p.reason}",
    ]
    return "\n".join(lines)


def _strategy(p: Plan) -> str:
    """The strategy, and for a mixed plan which stage is expert-parallel over which nodes."""
    k = p.expert_parallel_stage
    if p.strategy != "mixed" or k is None:
        return p.strategy
    return f"mixed, stage {k} expert-parallel over {'+'.join(p.stages[k].nodes)} (chained combine)"


def non_apple_note(p: Plan) -> str | None:
    """The cost model prices Apple GPUs (decode bound by memory bandwidth). For any other
    node (a Linux box: chip "generic", 100 GB/s and 1 TFLOPS guessed, or a measured CPU)
    its tok/s are far above what MLX's CPU backend runs: say so, once."""
    odd = list(dict.fromkeys(f"{ld.node} ({ld.chip})" for ld in p.loads
                             if ld.chip == "generic" or ld.chip not in CHIPS))
    if not odd:
        return None
    return (f"mlxdist: note: the speeds assume Apple GPUs, which {', '.join(odd)} "
            f"{'is' if len(odd) == 1 else 'are'} not; on MLX's CPU backend expect far less "
            f"(docs/placement.md, Limits)")
