"""The plan: immutable, JSON-able. `stages[*].layers` is what `mlxdist quantize` reads.

`Plan.to_json()` and `Plan.from_json()` are exact inverses (floats are written unrounded),
so a plan file read back is the plan that was written; `Plan.load(path)` is the reading
for users (one-line UserError on a missing or ill-formed file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mlxdist.errors import UserError

PLAN_FORMAT = 1
STRATEGIES = ("single", "pipeline", "expert-parallel", "mixed")


@dataclass(frozen=True)
class Stage:
    """A layer range [start, end). One node: a pipeline stage. Several nodes: an
    expert-parallel stage, attention replicated and the routed experts divided as
    `experts` says (each member some, each expert one member): the whole group in ring
    order (strategy "expert-parallel"), or, in a mixed plan, some consecutive ranks after
    rank 0 beside pipeline stages (`check_layout` says exactly what a plan may be)."""

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
    strategy: str  # "single", "pipeline", "expert-parallel" or "mixed"
    group: tuple[str, ...]  # the MLX group: node names in ring (rank) order
    stages: tuple[Stage, ...]
    loads: tuple[NodeLoad, ...]
    estimate: Estimate
    reason: str
    link: str

    @property
    def kind(self) -> str:
        """How its stages run: "pipeline" (one node each; one stage on one node too),
        "expert-parallel" (one stage over the whole group) or "mixed" (pipeline stages and
        one expert-parallel stage over some of the nodes)."""
        if self.expert_parallel_stage is None:
            return "pipeline"
        return "expert-parallel" if len(self.stages) == 1 else "mixed"

    @property
    def expert_parallel_stage(self) -> int | None:
        """The index of the expert-parallel stage (a plan has at most one), or None."""
        return next((k for k, s in enumerate(self.stages) if s.expert_parallel), None)

    def stage_ranks(self) -> tuple[tuple[int, ...], ...]:
        """The ranks running each stage, for a plan whose group is its stages' nodes in
        stage order (every planner plan; `check_layout` requires it of mixed plans): stage
        k runs on the next len(stages[k].nodes) ranks."""
        out, r = [], 0
        for s in self.stages:
            out.append(tuple(range(r, r + len(s.nodes))))
            r += len(s.nodes)
        return tuple(out)

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
                 "busy_ms_per_step": ld.busy_ms_per_step}
                for ld in self.loads
            ],
            "estimate": {
                "decode_ms_per_token": e.decode_ms_per_token,
                "decode_tok_s": e.decode_tok_s,
                "comm_ms_per_token": e.comm_ms_per_token,
                "step_ms_at_concurrency": e.step_ms_at_concurrency,
                "aggregate_tok_s": e.aggregate_tok_s,
                "prefill_tok_s": e.prefill_tok_s,
            },
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Plan:
        """The plan `to_json` wrote (`Plan.from_json(p.to_json()) == p`). A document that is
        not one raises ValueError naming the first wrong field; the derived fields
        (`rank`, `fraction_of_usable`, `decode_tok_s`) are checked against what they derive
        from, so an edited file cannot say two things."""
        _field(doc, "", "format", int)  # the object check, before reading any other key
        if doc["format"] != PLAN_FORMAT:
            raise ValueError(f"format is {doc['format']}, this mlxdist reads plan format {PLAN_FORMAT}")
        group = tuple(_strings(_field(doc, "", "group", list), "group"))
        strategy = _field(doc, "", "strategy", str)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy is {strategy!r}, not one of {', '.join(STRATEGIES)}")
        stages = tuple(_stage_from_json(s, f"stages[{i}]", group)
                       for i, s in enumerate(_field(doc, "", "stages", list)))
        check_layout(group, stages, strategy)
        loads = tuple(_load_from_json(n, f"nodes[{i}]", group)
                      for i, n in enumerate(_field(doc, "", "nodes", list)))
        est = _field(doc, "", "estimate", dict)
        e = Estimate(*(_field(est, "estimate.", k, float) for k in
                       ("decode_ms_per_token", "step_ms_at_concurrency", "aggregate_tok_s",
                        "prefill_tok_s", "comm_ms_per_token")))
        if e.decode_ms_per_token <= 0:
            raise ValueError("estimate.decode_ms_per_token must be positive")
        if _field(est, "estimate.", "decode_tok_s", float) != e.decode_tok_s:
            raise ValueError("estimate.decode_tok_s is not 1000 / decode_ms_per_token")
        return cls(_field(doc, "", "model", str), _field(doc, "", "model_type", str),
                   _field(doc, "", "bits", int), _field(doc, "", "context", int),
                   _field(doc, "", "concurrency", int), strategy, group, stages, loads, e,
                   _field(doc, "", "reason", str), _field(doc, "", "link", str))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """A plan file (`mlxdist plan --json > plan.json`), or a one-line UserError saying
        why it cannot be read."""
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise UserError(f"plan {path} not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"plan {path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
        try:
            return cls.from_json(json.loads(text))
        except ValueError as e:  # json's decode error is one too
            raise UserError(f"plan {path} is not a plan from `mlxdist plan --json`: {e}") from None


_KINDS = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}


def _field(doc: Any, where: str, key: str, kind: type) -> Any:
    """doc[key], checked to be of `kind` (bool is not a number; an int is a float)."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where.rstrip('.') or 'the document'} is not a JSON object")
    if key not in doc:
        raise ValueError(f"{where}{key} is missing")
    v = doc[key]
    ok = not isinstance(v, bool) and (isinstance(v, (int, float)) if kind is float else isinstance(v, kind))
    if not ok:
        raise ValueError(f"{where}{key} must be {_KINDS[kind]}, not {json.dumps(v)[:40]}")
    return float(v) if kind is float else v


def _strings(v: list, where: str) -> list[str]:
    if not all(isinstance(x, str) for x in v):
        raise ValueError(f"{where} must be a list of strings")
    return v


def _range(v: Any, where: str) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise ValueError(f"{where} must be [start, end] integers")
    return v[0], v[1]


def _ints(v: Any, where: str) -> tuple[int, ...]:
    if not (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise ValueError(f"{where} must be a list of integers")
    return tuple(v)


def _stage_from_json(s: Any, where: str, group: tuple[str, ...]) -> Stage:
    layers = _range(_field(s, where + ".", "layers", list), where + ".layers")
    nodes = tuple(_strings(_field(s, where + ".", "nodes", list), where + ".nodes"))
    if not nodes or any(n not in group for n in nodes):
        raise ValueError(f"{where}.nodes must name nodes of the group")
    if len(nodes) == 1:
        if "experts" in s:
            raise ValueError(f"{where}: a one-node stage has no experts map")
        return Stage(layers, nodes)
    experts = _field(s, where + ".", "experts", dict)
    if any(n not in nodes for n in experts):
        raise ValueError(f"{where}.experts names a node that is not in {where}.nodes")
    return Stage(layers, nodes, tuple((n, _ints(ids, f"{where}.experts.{n}")) for n, ids in experts.items()))


def check_layout(group: tuple[str, ...], stages: tuple[Stage, ...], strategy: str) -> None:
    """What a plan's stages may be, beyond each stage's own fields; ValueError naming the
    first rule broken (`Plan.load` makes it a one-line UserError):

    - an expert-parallel stage names each of its nodes once, gives each some experts and
      no expert to two of them (that every expert 0..E-1 has a node, the plan cannot say
      without the model: the planner, `mlxdist quantize --plan` and the runtime check it);
    - at most one expert-parallel stage;
    - alone, it is the whole group in ring order (strategy "expert-parallel");
    - beside pipeline stages (strategy "mixed", MLX's ring backend having no sub-groups):
      it does not include rank 0 (the group's first node runs a pipeline stage), its nodes
      are consecutive in the group's ring order, and the group is the stages' nodes in
      stage order (stage by stage, an expert-parallel stage's nodes in turn);
    - a plan without one is "single" or "pipeline"."""
    ep = [k for k, s in enumerate(stages) if s.expert_parallel]
    for k in ep:
        s, where = stages[k], f"stages[{k}]"
        if len(set(s.nodes)) != len(s.nodes):
            raise ValueError(f"{where}.nodes name a node twice")
        if set(dict(s.experts)) != set(s.nodes) or not all(ids for _, ids in s.experts):
            raise ValueError(f"{where}.experts must give each of its nodes some experts")
        ids = [e for _, mine in s.experts for e in mine]
        if len(set(ids)) != len(ids):
            twice = next(e for e in ids if ids.count(e) > 1)
            raise ValueError(f"{where}.experts give expert {twice} to more than one node")
    if len(ep) > 1:
        raise ValueError(f"stages {', '.join(map(str, ep))} are expert-parallel: a plan has at most one "
                         f"expert-parallel stage")
    if not ep:
        if strategy not in ("single", "pipeline"):
            raise ValueError(f"strategy is {strategy!r} but no stage is expert-parallel")
        return
    k = ep[0]
    s, where = stages[k], f"stages[{k}]"
    if len(stages) == 1:
        if s.nodes != group:
            raise ValueError(f"{where}: an expert-parallel plan's one stage runs on the whole group "
                             f"{list(group)} in ring order, not {list(s.nodes)}")
        if strategy != "expert-parallel":
            raise ValueError(f"strategy is {strategy!r} but its one stage is expert-parallel over the group: "
                             f"'expert-parallel'")
        return
    if strategy != "mixed":
        raise ValueError(f"strategy is {strategy!r} but {where} is expert-parallel beside pipeline stages: 'mixed'")
    if group and group[0] in s.nodes:
        raise ValueError(f"{where}: a mixed plan's expert-parallel stage cannot include rank 0 ({group[0]}); "
                         f"the group's first node runs a pipeline stage")
    m = len(s.nodes)
    if not any(group[r:r + m] == s.nodes for r in range(1, len(group) - m + 1)):
        raise ValueError(f"{where}.nodes {list(s.nodes)} are not consecutive ranks in the group's ring order "
                         f"{list(group)}")
    ranks = tuple(n for st in stages for n in st.nodes)
    if ranks != group:
        raise ValueError(f"group {list(group)} is not the stages' nodes in stage order {list(ranks)}")


def _load_from_json(n: Any, where: str, group: tuple[str, ...]) -> NodeLoad:
    w = where + "."
    name, rank = _field(n, w, "name", str), _field(n, w, "rank", int)
    if name not in group or rank != group.index(name):
        raise ValueError(f"{where}: node {name!r} is not rank {rank} of the group")
    layers = tuple(_range(r, f"{where}.layers[{i}]") for i, r in enumerate(_field(n, w, "layers", list)))
    load = NodeLoad(name, _field(n, w, "chip", str), _field(n, w, "weight_bytes", int),
                    _field(n, w, "kv_bytes", int), _field(n, w, "usable_bytes", int),
                    _field(n, w, "busy_ms_per_step", float), layers, _field(n, w, "experts_per_layer", int))
    if _field(n, w, "fraction_of_usable", float) != round(load.fraction, 4):
        raise ValueError(f"{where}.fraction_of_usable is not (weight_bytes + kv_bytes) / usable_bytes")
    return load


def rank_words(plan: Plan, r: int) -> str:
    """'rank 2 (layers 2-4, experts 4-7 of the expert-parallel stage 1)' or 'rank 0 (stage 0, layers 0-1)'."""
    at = 0
    for k, st in enumerate(plan.stages):
        if r < at + len(st.nodes):
            a, b = st.layers
            if st.expert_parallel:
                ids = st.experts_of(st.nodes[r - at])
                return f"rank {r} (layers {a}-{b - 1}, experts {expert_ids(ids)} of the expert-parallel stage {k})"
            return f"rank {r} (stage {k}, layers {a}-{b - 1})"
        at += len(st.nodes)
    raise IndexError(r)


def expert_ids(ids: Sequence[int]) -> str:
    """Expert ids compactly, runs as ranges: '0-4, 7'."""
    runs: list[list[int]] = []
    for e in ids:
        if runs and e == runs[-1][-1] + 1:
            runs[-1].append(e)
        else:
            runs.append([e])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
