"""A rank killed (SIGKILL) or frozen (SIGSTOP) mid-generation: reported by rank and host
within 10 s, every request ends with that error, no worker process is left (with restarts
off: test_runtime_healing.py has them on)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from runtime_helpers import reference_tokens, tiny_models, tokens_across_a_kill  # noqa: F401 (fixture)

from mlxdist.runtime.api import GenerationRequest
from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); the launcher reaps, so check the state too
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig,rank,words", [
    (signal.SIGKILL, 1, "killed by signal 9"),
    (signal.SIGSTOP, 2, "stopped answering"),
])
def test_lost_rank_is_reported_and_everything_ends(tiny_models, sig, rank, words):
    eng = open_engine(tiny_models["llama"], EngineConfig(heartbeat_timeout_s=3.0, restart=False), ranks=3,
                      split=[2, 2, 2])
    pids = {r: p.pid for r, p in eng._backend.launcher.procs.items()}
    try:
        h = eng.submit(GenerationRequest(tuple(b"go on and on"), 2000))
        events = iter(h)
        for _ in range(3):
            assert next(events).token is not None
        t0 = time.monotonic()
        os.kill(pids[rank], sig)
        last = None
        for ev in events:
            last = ev
        elapsed = time.monotonic() - t0
        assert last is not None and last.finish_reason == "error"
        assert f"rank {rank} on 127.0.0.1" in last.error and words in last.error, last.error
        assert elapsed < 10, elapsed
        with pytest.raises(RuntimeError, match=f"rank {rank}"):
            eng.submit(GenerationRequest(tuple(b"x"), 2))
    finally:
        eng.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        time.sleep(0.1)
    assert not [p for p in pids.values() if _alive(p)]


def test_regroup_hook_carries_requests_over(tiny_models):
    """The re-placement hook: on a lost rank, a new group on fewer ranks re-prefills the
    request (prompt + tokens so far) and it finishes with the uninterrupted run's tokens."""

    path = tiny_models["llama"]
    prompt = list(b"carry on")
    ref = reference_tokens(path, prompt, 200)
    eng = open_engine(path, EngineConfig(heartbeat_timeout_s=3.0), ranks=3, split=[2, 2, 2],
                      on_failure=lambda e, msg: e.regroup(ranks=2, split=[3, 3]))
    try:
        assert tokens_across_a_kill(eng, 1, prompt, 200, before=5) == ref
        assert len(eng._backend.hosts) == 2 and eng.failure is None
    finally:
        eng.close()
