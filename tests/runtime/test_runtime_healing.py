"""Request isolation and self-healing local ranks.

- A request whose sampler fails on the last stage ends with an error; the group and the
  other requests go on (their tokens equal mlx-lm's).
- A rank SIGKILLed or SIGSTOPped under local ranks: the engine restarts the group on this
  machine and the request in flight finishes with exactly the uninterrupted greedy tokens;
  health says degraded while it rebuilds, ok after.
- A crash loop gives up and says so.
- A cancelled prompt stops prefilling between chunks.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from runtime_helpers import drain_concurrently, reference_tokens, tiny_models  # noqa: F401 (fixture)

from mlxdist.runtime.api import GenerationRequest, SamplingParams
from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine


def _wait(pred, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_request_whose_sampler_fails_ends_alone(tiny_models, ranks):
    """mlx-lm's repetition penalty refuses a negative penalty (ValueError) while the last
    stage samples: that request ends with an error, the concurrent one is untouched."""
    path = tiny_models["llama"]
    good_prompt = list(b"all is well")
    ref = reference_tokens(path, good_prompt, 24)
    eng = open_engine(path, EngineConfig(in_process=ranks == 1), ranks=ranks)
    try:
        bad = eng.submit(GenerationRequest(tuple(b"poison"), 24,
                                           SamplingParams(temperature=0.7, repetition_penalty=-1.0)))
        good = eng.submit(GenerationRequest(tuple(good_prompt), 24))
        events = list(bad)
        assert events[-1].finish_reason == "error" and "sampler" in events[-1].error, events[-1]
        assert drain_concurrently([good]) == [ref]
        assert eng.health().status == "ok" and eng.failure is None
        assert eng.generate(good_prompt, 24) == ref  # still serving
    finally:
        eng.close()


def _tokens_across(eng, sig: int, prompt: list[int], max_tokens: int, before: int) -> tuple[list[int], list[str]]:
    """Greedy tokens of one request while rank 1 gets `sig` after `before` tokens; and the
    health statuses seen meanwhile."""
    pid = eng._backend.launcher.procs[1].pid
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            status = eng.health().status
            if not seen or seen[-1] != status:
                seen.append(status)
            time.sleep(0.01)

    events = iter(eng.submit(GenerationRequest(tuple(prompt), max_tokens)))
    got = [next(events).token for _ in range(before)]
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    os.kill(pid, sig)
    try:
        got += [ev.token for ev in events if ev.token is not None]
    finally:
        stop.set()
        watcher.join()
        if sig == signal.SIGSTOP:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return got, seen


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_local_ranks_restart_and_the_request_finishes_unchanged(tiny_models, sig):
    path = tiny_models["llama"]
    prompt = list(b"keep going")
    ref = reference_tokens(path, prompt, 160)
    eng = open_engine(path, EngineConfig(heartbeat_timeout_s=2.0), ranks=2)
    old_pids = {r: p.pid for r, p in eng._backend.launcher.procs.items()}
    try:
        got, seen = _tokens_across(eng, sig, prompt, 160, before=4)
        assert got == ref
        assert "degraded" in seen, seen
        _wait(lambda: eng.health().status == "ok", what="health ok")
        new_pids = {r: p.pid for r, p in eng._backend.launcher.procs.items()}
        assert not set(new_pids.values()) & set(old_pids.values())  # a new group
        assert [e["event"] for e in eng.events()][-3:] == ["restarting", "requests_healed", "restarted"]
        assert "rank 1" in eng.events()[-1]["message"]
        assert eng.generate(prompt, 20) == ref[:20]  # and it serves new requests
    finally:
        eng.close()


def test_a_crash_loop_gives_up_and_says_why(tiny_models):
    eng = open_engine(tiny_models["llama"], EngineConfig(restart_limit=1), ranks=2)
    try:
        for round_ in range(2):
            _wait(lambda: eng.health().status in ("ok", "down"), what="settled")
            assert eng.health().status == "ok"
            os.kill(eng._backend.launcher.procs[1].pid, signal.SIGKILL)
            _wait(lambda: eng.health().status != "ok", what="failure noticed")
        _wait(lambda: eng.health().status == "down", what="give up")
        h = eng.health()
        assert "crash loop" in h.reason and "rank 1" in h.reason, h
        with pytest.raises(RuntimeError, match="crash loop"):
            eng.submit(GenerationRequest(tuple(b"x"), 2))
    finally:
        eng.close()


def test_a_cancelled_prompt_stops_prefilling_between_chunks(tiny_models):
    """One process: each prompt chunk is waited for before the next is sent, so a cancel
    cuts a long prefill short (before, every chunk was queued on the device at once)."""
    eng = open_engine(tiny_models["llama"], EngineConfig(prefill_step=8), ranks=1)
    try:
        prompt = tuple((i * 7) % 250 + 1 for i in range(1600))  # 200 chunks
        h = eng.submit(GenerationRequest(prompt, 4))
        _wait(lambda: eng.stats().get("prefill_chunks", 0) >= 1, what="prefill started")
        h.cancel()
        # rank 0 ends the request (its "end" event) once it has dropped the sequence
        _wait(lambda: h.request_id not in eng._requests, what="the sequence freed")
        assert eng.stats()["prefill_chunks"] < 100, eng.stats()
        assert len(eng.generate(list(b"after"), 4)) == 4
    finally:
        eng.close()


def test_health_is_degraded_while_a_failure_hook_runs(tiny_models):
    """The cluster re-places through on_failure: meanwhile health() says so, then ok."""
    entered, gate = threading.Event(), threading.Event()

    def hook(engine, message: str) -> None:
        entered.set()
        gate.wait(60)
        engine.regroup()

    eng = open_engine(tiny_models["llama"], ranks=2, on_failure=hook)
    try:
        assert eng.health().status == "ok"
        os.kill(eng._backend.launcher.procs[1].pid, signal.SIGKILL)
        assert entered.wait(60)
        h = eng.health()
        assert h.status == "degraded" and "rank 1" in h.reason, h
        gate.set()
        _wait(lambda: eng.health().status == "ok", what="health ok after the hook")
        assert len(eng.generate(list(b"again"), 4)) == 4
    finally:
        gate.set()
        eng.close()
