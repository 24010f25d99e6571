"""A stand-in for `mlxdist.runtime.worker` in launch tests (nodes pick it up through
MLXDIST_WORKER_MODULE, set by the node's operator, never by the network): it takes the
arguments a node passes, joins the MLX ring group from MLX_RANK/MLX_HOSTFILE and checks
the group with an all_sum, so the hostfile and addresses are tested for real."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import mlx.core as mx


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage-dir", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--hostfile", required=True)
    p.add_argument("--backend", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    assert os.environ["MLX_RANK"] == str(args.rank)
    group = mx.distributed.init(backend=args.backend, strict=True)
    total = mx.distributed.all_sum(mx.array([float(group.rank() + 1)]), group=group)
    mx.eval(total)
    stage = json.loads((Path(args.stage_dir) / "stage.json").read_text())
    print(json.dumps({"rank": group.rank(), "size": group.size(), "sum": total.item(),
                      "stage": stage["stage"], "seed": args.seed}), flush=True)


if __name__ == "__main__":
    main()
