"""Cutting the layers into stages, and an expert-parallel stage's experts into per-node parts
(the only stage of a whole-group expert-parallel plan, or the one of a mixed plan)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlxdist.errors import UserError
from mlxdist.placement.plan import Plan
from mlxdist.shard_format import NODE_NAME
from quantize.groups import Group


@dataclass(frozen=True)
class Cut:
    """One output stage: its layer range and, for an expert-parallel stage, each node's
    routed expert ids in the plan's order (one part per node, docs/shard-format.md)."""

    layers: tuple[int, int]
    parts: tuple[tuple[str, tuple[int, ...]], ...] = ()


def read_plan(path: Path, num_layers: int, num_experts: int) -> list[Cut]:
    """The stages of a placement plan: a plan from `mlxdist plan --json` (its expert-parallel
    stage, whole-group or beside pipeline stages in a mixed plan, becomes per-node parts;
    `Plan.load` refuses layouts the runtime cannot run), or a hand-written {"stages":
    [{"layers": [start, end]}, ...]} (pipeline stages only; other keys ignored)."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"plan {path} not found") from None
    except (OSError, ValueError):
        raise UserError(f"plan {path} is not a JSON file") from None
    if isinstance(doc, dict) and "format" in doc:
        cuts = [Cut(s.layers, s.experts if s.expert_parallel else ()) for s in Plan.load(path).stages]
    else:
        try:
            cuts = [Cut((int(s["layers"][0]), int(s["layers"][1]))) for s in doc["stages"]]
        except (ValueError, KeyError, TypeError, IndexError):
            raise UserError(f"plan {path} is not a JSON object with stages[].layers = [start, end]") from None
    check_ranges([c.layers for c in cuts], num_layers, str(path))
    for c in cuts:
        check_parts(c, num_experts, str(path))
    return cuts


def check_parts(cut: Cut, num_experts: int, what: str) -> None:
    """An expert-parallel stage's parts: node names that can be directory names, and the
    routed experts 0..E-1 each given to exactly one node."""
    if not cut.parts:
        return
    if num_experts == 0:
        raise UserError(f"{what}: stage {list(cut.layers)} is expert-parallel but the model has no routed experts")
    for node, _ in cut.parts:
        if not NODE_NAME.match(node):
            raise UserError(f"{what}: node name {node!r} cannot be a directory name")
    ids = sorted(e for _, mine in cut.parts for e in mine)
    if ids != list(range(num_experts)) or not all(mine for _, mine in cut.parts):
        raise UserError(f"{what}: stage {list(cut.layers)} must give each node some experts and every "
                        f"expert 0..{num_experts - 1} to exactly one node")


def check_expert_layers(cuts: list[Cut], groups: list[Group], what: str) -> None:
    """An expert-parallel stage (whole-model, or a mixed plan's) must hold routed experts
    to divide: at least one MoE layer in its range."""
    for c in cuts:
        a, b = c.layers
        if c.parts and not any(g.kind == "experts" and g.layer is not None and a <= g.layer < b for g in groups):
            raise UserError(f"{what}: stage {list(c.layers)} is expert-parallel but none of its layers has "
                            f"routed experts")


def check_ranges(ranges: list[tuple[int, int]], num_layers: int, what: str) -> None:
    if not ranges:
        raise UserError(f"{what}: no stages")
    expect = 0
    for start, end in ranges:
        if start != expect or end <= start:
            raise UserError(f"{what}: stage layers must be contiguous, non-empty, from 0 to {num_layers}")
        expect = end
    if expect != num_layers:
        raise UserError(f"{what}: stages cover layers 0..{expect}, the model has {num_layers}")


def even_ranges(groups: list[Group], num_layers: int, num_stages: int, tied: bool = False) -> list[tuple[int, int]]:
    """Contiguous layer ranges whose largest stage (in output bytes, embedding counted on
    the first stage and the head, or a tied embedding's copy, on the last) is as small as it
    can be."""
    if not 1 <= num_stages <= num_layers:
        raise UserError(f"--stages must be between 1 and the number of layers ({num_layers})")
    sizes = [0] * num_layers
    first = last = 0
    for g in groups:
        if g.part == "embed":
            first += g.out_bytes
            if tied and num_stages > 1:  # the last stage holds a copy as its head
                last += g.out_bytes
        elif g.part == "head" or g.layer >= num_layers:
            last += g.out_bytes
        else:
            sizes[g.layer] += g.out_bytes
    sizes[0] += first
    sizes[-1] += last
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    # best[k][i]: smallest max-stage size splitting layers [0, i) into k stages
    inf = float("inf")
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for i in range(k, num_layers + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    ranges, i = [], num_layers
    for k in range(num_stages, 0, -1):
        ranges.append((cut[k][i], i))
        i = cut[k][i]
    return ranges[::-1]


def stage_of(g: Group, ranges: list[tuple[int, int]], num_layers: int) -> list[int]:
    """Stages that hold this group (the tied embedding lives on the first and the last)."""
    last = len(ranges) - 1
    if g.part == "embed":
        return [0]
    if g.part == "head" or g.layer >= num_layers:
        return [last]
    return [k for k, (a, b) in enumerate(ranges) if a <= g.layer < b]
