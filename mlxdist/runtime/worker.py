"""One rank: `python -m mlxdist.runtime.worker`, no arguments: its `WorkerSpec` (this rank's
facts and the engine's `EngineConfig`, launcher.py) comes as one msgpack blob on stdin, so
nothing (the session key least of all) is on its command line.

It connects to the engine's control server first (hello, then a heartbeat every 0.5 s from
a thread), checks its shard against the manifest, loads its layers, joins the MLX group
(MLX_RANK and MLX_HOSTFILE are set from the spec), says "ready", and runs the stage
loop: rank 0 the coordinator, fed by the engine's commands; the others `follower_loop`.
If the engine's connection drops, the worker exits at once.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from typing import Callable

from mlxdist.errors import plural
from mlxdist.runtime.api import handoff_problem
from mlxdist.framing import Channel, ProtocolError
from mlxdist.runtime.control import HEARTBEAT_INTERVAL_S, connect
from mlxdist.runtime.launcher import WorkerSpec


USAGE = ("python -m mlxdist.runtime.worker takes no arguments: a launcher starts it with its "
         "WorkerSpec (msgpack, runtime/launcher.py) on stdin")


def read_spec() -> WorkerSpec:
    """This rank's spec from stdin; anything else ends the process with one line."""
    if len(sys.argv) > 1 or sys.stdin is None or sys.stdin.isatty():
        sys.exit(USAGE)
    blob = sys.stdin.buffer.read()
    try:
        return WorkerSpec.from_msgpack(blob)
    except ValueError as e:
        sys.exit(f"mlxdist worker: stdin is not a WorkerSpec ({e if blob else 'it is empty'}); "
                 "a launcher starts the worker (runtime/launcher.py)")


def _heartbeat(chan: Channel, rank: int) -> None:
    while True:
        try:
            chan.send({"t": "hb", "rank": rank})
        except OSError:
            os._exit(3)
        time.sleep(HEARTBEAT_INTERVAL_S)


def _decoding_groups() -> int:
    """One decoding group where every rank runs on this machine's one GPU (a Mac's local
    ranks, or CUDA ranks not given a GPU each): groups in flight together would only take
    turns on it, each narrower. 0 (one group per stage) otherwise: ranks on their own
    machines, or on CPU cores. MLXDIST_GROUPS=N sets it (tests, tuning)."""
    import mlx.core as mx

    from mlxdist.runtime.launcher import SHARED_DEVICE_ENV

    if os.environ.get("MLXDIST_GROUPS", "").isdigit():
        return int(os.environ["MLXDIST_GROUPS"])
    return 1 if os.environ.get(SHARED_DEVICE_ENV) == "1" and mx.default_device().type == mx.gpu else 0


def _reader(chan: Channel, on_command) -> None:
    while True:
        try:
            msg = chan.recv()
        except (ConnectionError, ProtocolError):  # the engine is gone: nobody wants our output
            os._exit(3)
        on_command(msg)


def main() -> None:
    a = read_spec()
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: every thread's stack into the rank's log
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    chan = connect(a.control, bytes.fromhex(a.session))
    chan.send({"t": "hello", "rank": a.rank, "host": a.host, "pid": os.getpid()})
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


def run(a: WorkerSpec, chan: Channel) -> None:
    from pathlib import Path

    from mlxdist.runtime.coordinator import Coordinator
    from mlxdist.runtime.pipeline import StageRunner, follower_loop
    from mlxdist.runtime.source import StagePlan
    from mlxdist.runtime.stage import StageSpec, load_stage
    from mlxdist.runtime.ring_link import RingLink

    start, end = a.start, a.end
    plan = StagePlan(a.rank, start, end, a.num_layers, Path(a.model_dir), bool(a.shard_root),
                     tuple(Path(d) for d in a.parts))
    if a.shard_root:
        from dataclasses import replace

        from mlxdist.runtime.shards import verify_stage

        for d in plan.parts or (plan.model_dir,):  # each part against the manifest
            verify_stage(Path(a.shard_root), replace(plan, model_dir=d))
    if a.config.expert_parallel:
        return run_expert_parallel(a, chan, plan)
    if a.config.stages:
        from mlxdist.runtime.mixed import members

        if a.rank in (at := members(a.config.stages)):
            return run_member(a, chan, plan, at)
    stage = load_stage(plan.model_dir, StageSpec(start, end, a.num_layers), presanitized=plan.shard)

    group = _join_group(a)
    link = RingLink(group, _inbound_sockets(a), _collective_group(a, group))
    print(f"rank {a.rank}: layers {start}:{end}, waiting on {plural(len(link.wait_on), 'inbound ring socket')}",
          file=sys.stderr, flush=True)
    runner = StageRunner(stage)
    if a.rank == 0:
        coord = Coordinator(runner, link, chan.send, max_slots=a.config.max_concurrent,
                            prefill_step=a.config.prefill_step, prompt_cache=a.config.prompt_cache,
                            groups=_decoding_groups() or len(a.config.stages))  # a mixed plan: one per stage
        threading.Thread(target=_reader, args=(chan, coord.commands.put), daemon=True).start()
        chan.send({"t": "ready", "rank": a.rank})
        coord.run()
        print(f"rank 0: done, {coord.stats}", file=sys.stderr, flush=True)
    else:
        _follow(chan, a.rank, lambda wait_for_wake: follower_loop(
            runner, link, int(stage.config["hidden_size"]), wait_for_wake))


def run_expert_parallel(a: WorkerSpec, chan: Channel, plan) -> None:
    """One expert-parallel stage: join the group first (the MoE blocks hold it), load
    every layer keeping this rank's experts, then rank 0 coordinates, the others follow."""
    from mlxdist.runtime.ep_stage import Broadcast, EPCoordinator, EPRunner, ep_follower_loop, keep_own_experts
    from mlxdist.runtime.stage import StageSpec, load_stage

    group = _join_group(a)
    owned: list[int] = []
    mine = list(a.experts) or None
    stage = load_stage(plan.model_dir, StageSpec(plan.start, plan.end, plan.num_layers), presanitized=plan.shard,
                       prepare=lambda model: owned.extend(keep_own_experts(model.model, group, mine)),
                       parts=plan.parts)
    print(f"rank {a.rank}: expert parallel, all {plan.num_layers} layers, {len(owned)} experts "
          f"({owned[0]}..{owned[-1]})", file=sys.stderr, flush=True)
    bcast = Broadcast(group)
    if a.rank == 0:
        coord = EPCoordinator(EPRunner(stage, bcast), None, chan.send, max_slots=a.config.max_concurrent,
                              prefill_step=a.config.prefill_step, prompt_cache=a.config.prompt_cache)
        threading.Thread(target=_reader, args=(chan, coord.commands.put), daemon=True).start()
        chan.send({"t": "ready", "rank": a.rank})
        coord.run()
        print(f"rank 0: done, {coord.stats}, {bcast.messages} broadcasts", file=sys.stderr, flush=True)
        return
    _follow(chan, a.rank, lambda wait_for_wake: ep_follower_loop(stage, bcast, wait_for_wake))


def run_member(a: WorkerSpec, chan: Channel, plan, at) -> None:
    """A member of a mixed plan's expert-parallel stage (mixed.py): join the group first
    (the MoE blocks combine over it), load the stage's layers keeping this rank's experts,
    then follow; every member but the last relays each message to the next one."""
    from mlxdist.runtime.mixed import describe, load_member
    from mlxdist.runtime.pipeline import StageRunner, follower_loop
    from mlxdist.runtime.ring_link import RingLink
    from mlxdist.runtime.stage import StageSpec

    if a.config.handoff != "messages":
        raise RuntimeError("a mixed plan runs with handoff messages (lock-step runs are off)")
    if not a.experts:
        raise RuntimeError(f"rank {a.rank} is a member of an expert-parallel stage but was given no experts")
    group = _join_group(a)
    relay = a.rank < at.last
    spec = StageSpec(plan.start, plan.end, plan.num_layers, head=not relay)
    stage = load_member(plan.model_dir, spec, a.experts, group, at, presanitized=plan.shard, parts=plan.parts)
    link = RingLink(group, _inbound_sockets(a))
    print(describe(a.rank, spec, at, a.experts, stage) + f", waiting on "
          f"{plural(len(link.wait_on), 'inbound ring socket')}", file=sys.stderr, flush=True)
    runner = StageRunner(stage, combines=True)
    _follow(chan, a.rank, lambda wait_for_wake: follower_loop(
        runner, link, int(stage.config["hidden_size"]), wait_for_wake, relay=relay))


def _join_group(a: WorkerSpec):
    import mlx.core as mx

    os.environ["MLX_RANK"] = str(a.rank)
    os.environ["MLX_HOSTFILE"] = a.hostfile
    group = mx.distributed.init(backend=a.config.backend, strict=True)
    if group.size() != a.ranks or group.rank() != a.rank:
        raise RuntimeError(f"joined a group of {group.size()} as rank {group.rank()}, "
                           f"expected {a.ranks} as rank {a.rank}")
    return group


def _collective_group(a: WorkerSpec, group):
    """The group lock-step runs sum over (lockstep.py), or None for ring messages only."""
    if a.config.handoff == "messages":
        return None
    if problem := handoff_problem(a.config.handoff):
        raise RuntimeError(problem)
    if a.config.handoff == "collective":
        return group
    import mlx.core as mx

    host, port = a.nccl.rsplit(":", 1)
    os.environ.update(NCCL_HOST_IP=host, NCCL_PORT=port, MLX_WORLD_SIZE=str(a.ranks))
    nccl = mx.distributed.init(backend="nccl", strict=True)
    if nccl.size() != a.ranks or nccl.rank() != a.rank:
        raise RuntimeError(f"NCCL group: rank {nccl.rank()} of {nccl.size()}, expected {a.rank} of {a.ranks}")
    return nccl


def _follow(chan: Channel, rank: int, loop: Callable[[Callable[[int], None]], None]) -> None:
    """A follower: say ready, wait parked for the first wake-up, then run `loop`, which
    parks again (through the `wait_for_wake` it is given) whenever rank 0 has no work."""
    wakes = threading.Condition()
    count = [0]

    def on_command(msg: dict) -> None:
        if msg.get("t") == "wake":
            with wakes:
                count[0] += 1
                wakes.notify_all()

    def wait_for_wake(kicks: int) -> None:
        with wakes:
            wakes.wait_for(lambda: count[0] > kicks)

    threading.Thread(target=_reader, args=(chan, on_command), daemon=True).start()
    chan.send({"t": "ready", "rank": rank})
    wait_for_wake(0)  # start parked: the first request's wake-up starts the loop
    loop(wait_for_wake)


def _inbound_sockets(a: WorkerSpec) -> list:
    """For the ring backend: the sockets the previous rank sends on (see RingLink)."""
    import json

    from mlxdist.runtime.ring_link import inbound_ring_sockets

    # Sleeping in select() costs a wake-up per message (~0.4 ms here) but frees the core
    # the backend's polling would burn: worth it when ranks outnumber cores (4 ranks on 2
    # cores: 33 -> 142 tok/s), not when each rank has cores to spare.
    mode = os.environ.get("MLXDIST_RING_SELECT", "auto")
    if a.config.backend != "ring" or mode == "0" or (mode == "auto" and (os.cpu_count() or 1) >= 2 * a.ranks):
        return []
    try:
        mine = json.loads(open(a.hostfile).read())[a.rank]
        return inbound_ring_sockets({int(addr.rsplit(":", 1)[1]) for addr in mine})
    except (OSError, ValueError, IndexError):
        return []


if __name__ == "__main__":
    sys.exit(main())
