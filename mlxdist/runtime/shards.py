"""Refuse a stage whose shard disagrees with the plan, before any compute.

Checks, from docs/shard-format.md: stage.json names the planned layer range; the stage's
(or the node's part's) safetensors file holds exactly the tensors the manifest gives that
directory, each with the manifest's shape and dtype, and each tensor's bytes hash to the
manifest's sha256. Only the safetensors header and raw bytes are read (no MLX), in 1 MiB
blocks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlxdist.errors import UserError
from mlxdist.runtime.source import StagePlan
from mlxdist.shard_format import WEIGHTS, Manifest, StageJson, read_safetensors_header


class ShardMismatch(UserError):
    """The stage on disk is not the stage the plan asks for."""


def verify_stage(root: Path, plan: StagePlan, check_hashes: bool = True) -> None:
    stage_dir = plan.model_dir
    try:
        manifest = Manifest.load(root)
        meta = StageJson.load(stage_dir)
        wanted = manifest.tensors_of(meta.stage, meta.node)
        head = read_safetensors_header(stage_dir / WEIGHTS)
    except (UserError, IndexError, KeyError) as e:
        raise ShardMismatch(f"stage {stage_dir}: {e}") from None
    if meta.layers != (plan.start, plan.end):
        raise ShardMismatch(f"stage {stage_dir} holds layers {list(meta.layers)}, "
                            f"the plan gives rank {plan.rank} layers [{plan.start}, {plan.end}]")
    extra, missing = sorted(set(head) - set(wanted)), sorted(set(wanted) - set(head))
    if extra or missing:
        raise ShardMismatch(f"stage {stage_dir}: tensors differ from the manifest "
                            f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with open(stage_dir / WEIGHTS, "rb") as f:
        for name, info in head.items():
            t = wanted[name]
            if (info.shape, info.dtype) != (t.shape, t.dtype):
                raise ShardMismatch(f"stage {stage_dir}: {name} is {info.dtype} {list(info.shape)}, "
                                    f"the manifest says {t.dtype} {list(t.shape)}")
            if check_hashes and _sha256_range(f, info.start, info.end) != t.sha256:
                raise ShardMismatch(f"stage {stage_dir}: {name} fails its sha256 check")


def _sha256_range(f, start: int, end: int) -> str:
    """sha256 of the file's bytes [start, end), read in 1 MiB blocks."""
    f.seek(start)
    h, left = hashlib.sha256(), end - start
    while left:
        block = f.read(min(left, 1 << 20))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.hexdigest()
