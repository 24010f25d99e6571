"""Where each stage's weights come from: an mlx-lm directory cut by layer index, or a shard
directory (docs/shard-format.md) with one self-contained directory per stage (or, for an
expert-parallel stage, one part per node)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mlxdist.errors import UserError, plural
from mlxdist.runtime.config import StageLayout
from mlxdist.shard_format import MANIFEST, Manifest, Part


@dataclass(frozen=True)
class StagePlan:
    """One rank's part: layers [start, end) of num_layers, loaded from `model_dir`.
    `shard` is True when model_dir is a shard-format stage directory (verified before use).
    `parts`: when the rank runs several parts of an expert-parallel stage (after a node
    loss), their directories in row order, model_dir the first: its stacked experts are
    theirs concatenated, everything else the first's."""

    rank: int
    start: int
    end: int
    num_layers: int
    model_dir: Path
    shard: bool = False
    parts: tuple[Path, ...] = ()


@dataclass(frozen=True)
class ModelSource:
    root: Path
    config: dict[str, Any]
    stages: tuple[StagePlan, ...]
    expert_parallel: bool = False  # every stage is all layers; the ranks divide the experts
    # per rank, when not the even split; a mixed plan: the members' of its expert-parallel stage, () elsewhere
    experts: tuple[tuple[int, ...], ...] = ()
    # a mixed plan's stages (EngineConfig.stages, each member's experts filled in); (): not mixed
    layout: tuple[StageLayout, ...] = ()

    @property
    def mixed(self) -> bool:
        return bool(self.layout)

    @property
    def context_length(self) -> int:
        return int(self.config.get("max_position_embeddings") or 4096)

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    def load_tokenizer(self) -> Any:
        from mlx_lm.utils import load_tokenizer

        eos = self.config.get("eos_token_id")
        return load_tokenizer(self.root, eos_token_ids=[eos] if isinstance(eos, int) else eos)


def even_split(num_layers: int, ranks: int) -> list[int]:
    base, extra = divmod(num_layers, ranks)
    return [base + (1 if r < extra else 0) for r in range(ranks)]


def resolve_source(path: Path, ranks: int, split: Sequence[int] | None = None,
                   expert_parallel: bool = False,
                   experts: Sequence[Sequence[int]] | None = None,
                   stages: Sequence[StageLayout] = ()) -> ModelSource:
    """Which rank loads what: `split` layers per rank (a pipeline), or with
    `expert_parallel` every layer on every rank, or `stages`, a mixed plan."""
    path = Path(path).expanduser()
    if not (path / "config.json").exists():
        raise UserError(f"{path} is not a model directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    num_layers = int(config.get("num_hidden_layers", 0))
    if ranks < 1:
        raise UserError("--ranks must be at least 1")
    if stages:
        if expert_parallel or split is not None:
            raise UserError("a mixed plan gives every stage's layers and ranks itself: no --split or --expert-parallel")
        return _mixed_source(path, config, ranks, tuple(stages))
    if expert_parallel and ranks > 1:
        return _expert_parallel_source(path, config, ranks, split, experts)
    if ranks > num_layers:
        raise UserError(f"{plural(ranks, 'rank')} but the model has only {plural(num_layers, 'layer')}")
    if split is None:
        split = even_split(num_layers, ranks)
    split = [int(s) for s in split]
    if len(split) != ranks or any(s <= 0 for s in split) or sum(split) != num_layers:
        raise UserError(f"split {','.join(map(str, split))} must have {ranks} positive entries "
                        f"summing to the model's {num_layers} layers")
    bounds, start = [], 0
    for s in split:
        bounds.append((start, start + s))
        start += s
    manifest = _manifest(path)
    if manifest and any(st.parts for st in manifest.stages):
        raise UserError(f"{path} holds expert-parallel parts: run it expert-parallel (--expert-parallel)")
    shard_dirs = {st.layers: path / st.dir for st in manifest.stages} if manifest else {}
    use_shards = bool(shard_dirs) and all(b in shard_dirs for b in bounds)
    stages = tuple(
        StagePlan(r, a, b, num_layers, shard_dirs[(a, b)] if use_shards else path, use_shards)
        for r, (a, b) in enumerate(bounds)
    )
    return ModelSource(path, config, stages)


def _expert_parallel_source(path: Path, config: dict[str, Any], ranks: int, split: Sequence[int] | None,
                            experts: Sequence[Sequence[int]] | None) -> ModelSource:
    """One expert-parallel stage over all ranks: each rank reads every layer (from the
    mlx-lm directory, or a shard's single all-layer stage) and keeps its own experts, or,
    from a conversion cut into per-node parts, its own part (holding its experts only)."""
    num_layers = int(config.get("num_hidden_layers", 0))
    if split is not None:
        raise UserError("--split is for pipeline stages; expert parallel runs every layer on every rank")
    n_experts = _routed_experts(path, config, ranks, "--expert-parallel")
    owned: tuple[tuple[int, ...], ...] = ()
    if experts is not None:
        owned = tuple(tuple(int(e) for e in mine) for mine in experts)
        _check_shares(owned, ranks, n_experts, "experts")
    manifest = _manifest(path)
    if manifest is None:
        stages = tuple(StagePlan(r, 0, num_layers, num_layers, path) for r in range(ranks))
        return ModelSource(path, config, stages, expert_parallel=True, experts=owned)
    whole = [st for st in manifest.stages if st.layers == (0, num_layers)]
    if not whole:
        raise UserError(f"{path}: expert parallel needs a shard with one all-layer stage "
                        f"(quantize it with a single stage or an expert-parallel plan) or the mlx-lm directory")
    if not whole[0].parts:
        stages = tuple(StagePlan(r, 0, num_layers, num_layers, path / whole[0].dir, True) for r in range(ranks))
        return ModelSource(path, config, stages, expert_parallel=True, experts=owned)
    return _parts_source(path, config, whole[0].parts, ranks, owned)


def _parts_source(path: Path, config: dict[str, Any], parts: Sequence[Part], ranks: int,
                  owned: tuple[tuple[int, ...], ...]) -> ModelSource:
    """An expert-parallel conversion cut into per-node parts. Without `owned`, rank r loads
    part r (the plan's ring order), which holds exactly its experts in its row order. With
    `owned` (a re-placement may give a rank several parts), each rank's expert ids must be
    whole parts' ids concatenated: it loads those parts, its rows in that order."""
    num_layers = int(config["num_hidden_layers"])
    if not owned:
        _check_part_count(path, parts, ranks)
        owned = tuple(p.experts for p in parts)
    stages = tuple(_member_plan(path, parts, r, mine, 0, num_layers, num_layers) for r, mine in enumerate(owned))
    return ModelSource(path, config, stages, expert_parallel=True, experts=owned)


def _routed_experts(path: Path, config: dict[str, Any], ranks: int, what: str) -> int:
    """The model's routed experts per layer, enough for `ranks` to share; `what` (the
    option or stage that asks) names the need in the UserError otherwise."""
    n_experts = int(config.get("n_routed_experts") or config.get("num_experts") or 0)
    if n_experts == 0:
        raise UserError(f"{path}: {what} needs an MoE model (deepseek_v3, qwen3_moe); "
                        f"config.json names no routed experts")
    if ranks > n_experts:
        raise UserError(f"{plural(ranks, 'rank')} but the model has only {plural(n_experts, 'routed expert')} per layer")
    return n_experts


def _check_shares(owned: Sequence[Sequence[int]], ranks: int, n_experts: int, who: str) -> None:
    """`owned` gives each of `ranks` a non-empty share and every expert to exactly one."""
    if len(owned) != ranks or sorted(e for mine in owned for e in mine) != list(range(n_experts)) or not all(owned):
        raise UserError(f"{who} must give each of the {plural(ranks, 'rank')} a non-empty share, and "
                        f"every expert 0..{n_experts - 1} to exactly one rank")


def _check_part_count(path: Path, parts: Sequence[Part], ranks: int, layers: tuple[int, int] | None = None) -> None:
    """One rank per part: of the whole model, or of a mixed plan's stage over `layers`."""
    if ranks != len(parts):
        where, run = (f" of layers {list(layers)}", "that stage") if layers else ("", "it")
        raise UserError(f"{path} holds the experts{where} in {plural(len(parts), 'part')} "
                        f"({', '.join(p.node for p in parts)}): run {run} on {plural(len(parts), 'rank')}")


def _member_plan(path: Path, parts: Sequence[Part], rank: int, mine: Sequence[int], start: int, end: int,
                 num_layers: int) -> StagePlan:
    """The StagePlan of `rank`, a member of an expert-parallel stage cut into per-node
    parts: its expert ids `mine` must be whole parts' ids concatenated, in their row order;
    it loads those parts."""
    by_first = {p.experts[0]: p for p in parts}
    held, i = [], 0
    while i < len(mine):
        p = by_first.get(mine[i])
        if p is None or tuple(mine[i:i + len(p.experts)]) != p.experts:
            raise UserError(f"{path}: rank {rank}'s experts {list(mine)} are not whole parts' "
                            f"({', '.join(p.node for p in parts)}) in their row order; a part holds only the "
                            f"experts it was converted with")
        held.append(path / p.dir)
        i += len(p.experts)
    return StagePlan(rank, start, end, num_layers, held[0], True, tuple(held) if len(held) > 1 else ())


def _mixed_source(path: Path, config: dict[str, Any], ranks: int, layout: tuple[StageLayout, ...]) -> ModelSource:
    """A mixed plan: pipeline stages on one rank each, and one expert-parallel stage over
    consecutive ranks after rank 0's, whose members each keep their own experts (sliced on
    load from an mlx-lm directory or the shard's whole stage, or the shard's part of each
    member's node)."""
    from mlxdist.runtime.expert_parallel import split_experts

    num_layers = int(config.get("num_hidden_layers", 0))
    bounds = [(s.start, s.end) for s in layout]
    if [a for a, _ in bounds] != [0] + [b for _, b in bounds[:-1]] or bounds[-1][1] != num_layers:
        raise UserError(f"the plan's stages {[list(b) for b in bounds]} must cut the model's {num_layers} "
                        f"layers into contiguous ranges from 0")
    wide = [k for k, s in enumerate(layout) if s.ranks > 1]
    if len(wide) != 1:
        raise UserError(f"a mixed plan has one expert-parallel stage (over several ranks); this one has {len(wide)}")
    k = wide[0]
    ep = layout[k]
    if k == 0:
        raise UserError("the expert-parallel stage of a mixed plan must come after the first stage: rank 0 "
                        "runs a pipeline stage of its own (or run the whole model expert-parallel)")
    if sum(s.ranks for s in layout) != ranks:
        raise UserError(f"the plan's stages run on {plural(sum(s.ranks for s in layout), 'rank')}, not {ranks}")
    n_experts = _routed_experts(path, config, ep.ranks, "an expert-parallel stage")
    manifest = _manifest(path)
    entries = {st.layers: st for st in manifest.stages} if manifest else {}
    use_shards = bool(entries) and all(b in entries for b in bounds)
    parts = entries[bounds[k]].parts if use_shards else ()
    if manifest and any(st.parts for st in manifest.stages) and not parts:
        raise UserError(f"{path} holds expert-parallel parts for layers "
                        f"{[list(st.layers) for st in manifest.stages if st.parts]}, not for this plan's "
                        f"expert-parallel stage {list(bounds[k])}; convert it with this plan")
    if parts and not ep.experts:  # the parts say who holds what
        _check_part_count(path, parts, ep.ranks, bounds[k])
        owned = tuple(p.experts for p in parts)
    else:
        owned = ep.experts or tuple(tuple(e) for e in split_experts(n_experts, ep.ranks))
    _check_shares(owned, ep.ranks, n_experts, "the expert-parallel stage")
    first = sum(s.ranks for s in layout[:k])
    plans, rank = [], 0
    for j, (a, b) in enumerate(bounds):
        for m in range(layout[j].ranks):
            if not use_shards:
                plans.append(StagePlan(rank, a, b, num_layers, path))
            elif j == k and parts:
                plans.append(_member_plan(path, parts, rank, owned[m], a, b, num_layers))
            else:
                plans.append(StagePlan(rank, a, b, num_layers, path / entries[(a, b)].dir, True))
            rank += 1
    experts = tuple(owned[r - first] if first <= r < first + ep.ranks else () for r in range(ranks))
    filled = tuple(StageLayout(s.start, s.end, s.ranks, owned if j == k else ()) for j, s in enumerate(layout))
    return ModelSource(path, config, tuple(plans), experts=experts, layout=filled)


def _manifest(path: Path) -> Manifest | None:
    """The shard's manifest, None for an mlx-lm directory (no manifest.json)."""
    return Manifest.load(path) if (path / MANIFEST).exists() else None
