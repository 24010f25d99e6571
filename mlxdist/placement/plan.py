"""The plan: immutable, JSON-able. `stages[*].layers` is what `mlxdist quantize` reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PLAN_FORMAT = 1


@dataclass(frozen=True)
class Stage:
    """A layer range [start, end). One node: a pipeline stage. Several nodes (always the
    whole group, in ring order): an expert-parallel stage, attention replicated and the
    routed experts divided as `experts` says."""

    layers: tuple[int, int]
    nodes: tuple[str, ...]
    experts: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def expert_parallel(self) -> bool:
        return len(self.nodes) > 1

    def experts_of(self, node: str) -> tuple[int, ...]:
        return dict(self.experts).get(node, ())


@dataclass(frozen=True)
class NodeLoad:
    node: str
    chip: str
    weight_bytes: int
    kv_bytes: int
    usable_bytes: int
    busy_ms_per_step: float  # this node's compute+read time in one decode step
    layers: tuple[tuple[int, int], ...]
    n_experts: int  # routed experts held per MoE layer (all of them outside EP)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def fraction(self) -> float:
        return self.total_bytes / self.usable_bytes if self.usable_bytes else float("inf")


@dataclass(frozen=True)
class Estimate:
    decode_ms_per_token: float  # one stream alone
    step_ms_at_concurrency: float  # per-stream ms/token with `concurrency` streams
    aggregate_tok_s: float  # all streams together at `concurrency`
    prefill_tok_s: float
    comm_ms_per_token: float  # of decode_ms_per_token, the part spent on links

    @property
    def decode_tok_s(self) -> float:
        return 1000.0 / self.decode_ms_per_token


@dataclass(frozen=True)
class Plan:
    model: str
    model_type: str
    bits: int
    context: int
    concurrency: int
    strategy: str  # "single", "pipeline" or "expert-parallel"
    group: tuple[str, ...]  # the MLX group: node names in ring (rank) order
    stages: tuple[Stage, ...]
    loads: tuple[NodeLoad, ...]
    estimate: Estimate
    reason: str
    link: str

    def to_json(self) -> dict[str, Any]:
        e = self.estimate
        return {
            "format": PLAN_FORMAT,
            "model": self.model, "model_type": self.model_type, "bits": self.bits,
            "context": self.context, "concurrency": self.concurrency,
            "strategy": self.strategy, "link": self.link,
            "group": list(self.group),
            "stages": [
                {"layers": [s.layers[0], s.layers[1]], "nodes": list(s.nodes),
                 **({"experts": {n: list(ids) for n, ids in s.experts}} if s.expert_parallel else {})}
                for s in self.stages
            ],
            "nodes": [
                {"name": ld.node, "chip": ld.chip, "rank": self.group.index(ld.node),
                 "layers": [list(r) for r in ld.layers], "experts_per_layer": ld.n_experts,
                 "weight_bytes": ld.weight_bytes, "kv_bytes": ld.kv_bytes,
                 "usable_bytes": ld.usable_bytes, "fraction_of_usable": round(ld.fraction, 4),
                 "busy_ms_per_step": round(ld.busy_ms_per_step, 3)}
                for ld in self.loads
            ],
            "estimate": {
                "decode_ms_per_token": round(e.decode_ms_per_token, 3),
                "decode_tok_s": round(e.decode_tok_s, 2),
                "comm_ms_per_token": round(e.comm_ms_per_token, 3),
                "step_ms_at_concurrency": round(e.step_ms_at_concurrency, 3),
                "aggregate_tok_s": round(e.aggregate_tok_s, 2),
                "prefill_tok_s": round(e.prefill_tok_s, 1),
            },
            "reason": self.reason,
        }
