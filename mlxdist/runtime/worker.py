"""One rank: `python -m mlxdist.runtime.worker --rank R --ranks N --hostfile H --model-dir D
--layers START:END --num-layers L --control HOST:PORT --session S [--backend ring]
[--shard-root ROOT] [--max-slots 8] [--prefill-step 2048] [--host NAME]`

It connects to the engine's control server first (hello, then a heartbeat every 0.5 s from
a thread), checks its shard against the manifest, loads its layers, joins the MLX group
(MLX_RANK and MLX_HOSTFILE are set from the arguments), says "ready", and runs the stage
loop: rank 0 the coordinator, fed by the engine's commands; the others `follower_loop`.
If the engine's connection drops, the worker exits at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback

from mlxdist.runtime.control import HEARTBEAT_INTERVAL_S, Channel, connect


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlxdist.runtime.worker")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--hostfile", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--layers", required=True, help="START:END (END exclusive)")
    p.add_argument("--num-layers", type=int, required=True)
    p.add_argument("--control", required=True, help="HOST:PORT of the engine")
    p.add_argument("--session", required=True)
    p.add_argument("--backend", default="ring")
    p.add_argument("--shard-root", default="")
    p.add_argument("--max-slots", type=int, default=8)
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--host", default="127.0.0.1")
    return p.parse_args(argv)


def _heartbeat(chan: Channel, rank: int) -> None:
    while True:
        try:
            chan.send({"t": "hb", "rank": rank})
        except OSError:
            os._exit(3)
        time.sleep(HEARTBEAT_INTERVAL_S)


def _reader(chan: Channel, on_command) -> None:
    while True:
        try:
            msg = chan.recv()
        except Exception:
            msg = None
        if msg is None:  # the engine is gone: nobody wants our output
            os._exit(3)
        on_command(msg)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    chan = connect(a.control)
    chan.send({"t": "hello", "rank": a.rank, "host": a.host, "pid": os.getpid(), "session": a.session})
    threading.Thread(target=_heartbeat, args=(chan, a.rank), daemon=True).start()
    try:
        run(a, chan)
    except BaseException as e:
        msg = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        try:
            chan.send({"t": "error", "rank": a.rank, "msg": msg})
            time.sleep(0.2)
        except OSError:
            pass
        os._exit(1)
    chan.send({"t": "bye", "rank": a.rank})
    os._exit(0)


def run(a: argparse.Namespace, chan: Channel) -> None:
    from pathlib import Path

    import mlx.core as mx

    from mlxdist.runtime.pipeline import Coordinator, StageRunner, follower_loop
    from mlxdist.runtime.source import StagePlan
    from mlxdist.runtime.stage import StageSpec, load_stage
    from mlxdist.runtime.wire import RingLink

    start, end = (int(x) for x in a.layers.split(":"))
    plan = StagePlan(a.rank, start, end, a.num_layers, Path(a.model_dir), bool(a.shard_root))
    if a.shard_root:
        from mlxdist.runtime.shards import verify_stage

        verify_stage(Path(a.shard_root), plan)
    stage = load_stage(plan.model_dir, StageSpec(start, end, a.num_layers), presanitized=plan.shard)

    os.environ["MLX_RANK"] = str(a.rank)
    os.environ["MLX_HOSTFILE"] = a.hostfile
    group = mx.distributed.init(backend=a.backend, strict=True)
    if group.size() != a.ranks or group.rank() != a.rank:
        raise RuntimeError(f"joined a group of {group.size()} as rank {group.rank()}, "
                           f"expected {a.ranks} as rank {a.rank}")
    link = RingLink(group)
    runner = StageRunner(stage)
    if a.rank == 0:
        coord = Coordinator(runner, link, chan.send, max_slots=a.max_slots, prefill_step=a.prefill_step)
        threading.Thread(target=_reader, args=(chan, coord.commands.put), daemon=True).start()
        chan.send({"t": "ready", "rank": a.rank})
        coord.run()
    else:
        threading.Thread(target=_reader, args=(chan, lambda m: None), daemon=True).start()
        chan.send({"t": "ready", "rank": a.rank})
        follower_loop(runner, link, int(stage.config["hidden_size"]))


if __name__ == "__main__":
    sys.exit(main())
