"""Refuse a stage whose shard disagrees with the plan, before any compute.

Checks, from docs/shard-format.md: stage.json names the planned layer range; every tensor
the manifest gives this stage is in the stage's safetensors file with the manifest's shape
and dtype and no others; each tensor's bytes hash to the manifest's sha256. Only the
safetensors header and raw bytes are read (no MLX), in 1 MiB blocks.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from mlxdist.errors import UserError
from mlxdist.runtime.source import StagePlan


class ShardMismatch(UserError):
    """The stage on disk is not the stage the plan asks for."""


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(n))
    head.pop("__metadata__", None)
    return head, 8 + n


def verify_stage(root: Path, plan: StagePlan, check_hashes: bool = True) -> None:
    stage_dir = plan.model_dir
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        stage_json = json.loads((stage_dir / "stage.json").read_text())
    except (OSError, ValueError) as e:
        raise ShardMismatch(f"stage {stage_dir}: unreadable manifest or stage.json: {e}") from e
    if list(stage_json.get("layers", [])) != [plan.start, plan.end]:
        raise ShardMismatch(f"stage {stage_dir} holds layers {stage_json.get('layers')}, "
                            f"the plan gives rank {plan.rank} layers [{plan.start}, {plan.end}]")
    tensors = manifest.get("tensors", {})
    if isinstance(tensors, dict):  # the doc's {name: {...}}; the converter writes a list
        tensors = [{"name": n, **t} for n, t in tensors.items()]
    wanted = {t["name"]: t for t in tensors if int(t.get("stage", -1)) == int(stage_json.get("stage", -2))}
    path = stage_dir / "weights.safetensors"
    if not path.exists():
        raise ShardMismatch(f"stage {stage_dir}: weights.safetensors is missing")
    head, data_start = read_safetensors_header(path)
    if wanted and set(head) != set(wanted):
        extra, missing = sorted(set(head) - set(wanted)), sorted(set(wanted) - set(head))
        raise ShardMismatch(f"stage {stage_dir}: tensors differ from the manifest "
                            f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with open(path, "rb") as f:
        for name, t in wanted.items():
            info = head[name]
            if list(info["shape"]) != list(t["shape"]):
                raise ShardMismatch(f"stage {stage_dir}: {name} has shape {info['shape']}, "
                                    f"manifest says {t['shape']}")
            if check_hashes and t.get("sha256"):
                a, b = info["data_offsets"]
                f.seek(data_start + a)
                h, left = hashlib.sha256(), b - a
                while left:
                    block = f.read(min(left, 1 << 20))
                    if not block:
                        break
                    h.update(block)
                    left -= len(block)
                if h.hexdigest() != t["sha256"]:
                    raise ShardMismatch(f"stage {stage_dir}: {name} fails its sha256 check")
