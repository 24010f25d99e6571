"""Cutting the layers into pipeline stages."""

from __future__ import annotations

import json
from pathlib import Path

from mlxdist.errors import UserError
from quantize.groups import Group


def read_plan(path: Path, num_layers: int) -> list[tuple[int, int]]:
    """Layer ranges from a placement plan: {"stages": [{"layers": [start, end]}, ...]}."""
    try:
        stages = json.loads(Path(path).read_text())["stages"]
        ranges = [(int(s["layers"][0]), int(s["layers"][1])) for s in stages]
    except FileNotFoundError:
        raise UserError(f"plan {path} not found") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise UserError(f"plan {path} is not a JSON object with stages[].layers = [start, end]") from None
    check_ranges(ranges, num_layers, str(path))
    return ranges


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
