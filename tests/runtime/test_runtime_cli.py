"""`mlxdist run` as a user runs it."""

from __future__ import annotations

from runtime_helpers import run_cli, tiny_models  # noqa: F401 (fixture)

from mlxdist.runtime.engine import open_engine


def test_run_two_ranks_streams_the_answer(tiny_models):
    path = tiny_models["llama"]
    with open_engine(path) as eng:
        tokens = eng.generate(eng.encode_chat([{"role": "user", "content": "hi"}]), max_tokens=6)
        expected = eng.tokenizer.decode(tokens)
    r = run_cli("run", str(path), "--ranks", "2", "--split", "4,2", "-p", "hi", "--max-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected
    r = run_cli("run", str(path), "--ranks", "2", "--handoff", "collective", "-p", "hi", "--max-tokens", "6")
    assert (r.returncode, r.stdout.rstrip("\n")) == (0, expected), r.stderr  # lock-step runs
    # one rank runs in process; it must exit cleanly too (MLX can abort at exit, see local.py)
    r = run_cli("run", str(path), "-p", "hi", "--max-tokens", "6")
    assert (r.returncode, r.stdout.rstrip("\n")) == (0, expected), r.stderr


def test_run_refuses_bad_input(tiny_models):
    r = run_cli("run", str(tiny_models["llama"]), "--ranks", "2", "--split", "4,4", "-p", "hi")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "mlxdist: error: split 4,4 must have 2 positive entries summing to the model's 6 layers"]
    r = run_cli("run", "/nonexistent/model", "-p", "hi")
    assert r.returncode == 2 and "not a model directory" in r.stderr
    # this machine's MLX has no CUDA: NCCL hand-offs are refused at once, in one line
    r = run_cli("run", str(tiny_models["llama"]), "--ranks", "2", "--handoff", "nccl", "-p", "hi")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "CUDA" in r.stderr


def test_run_reports_a_killed_rank_and_exits(tiny_models):
    """`mlxdist run` with a worker SIGKILLed mid-answer: one-line error naming the rank and
    host, non-zero exit, no worker left, well within 10 s."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from runtime_helpers import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "mlxdist", "run", str(tiny_models["llama"]), "--ranks", "3",
                          "-p", "talk", "--max-tokens", "2000"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    try:
        p.stdout.read(4)  # it is answering
        workers = _children(p.pid)
        assert len(workers) == 3
        victim = next(pid for pid, cmd in workers.items() if "--rank 1 " in cmd)
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        _, err = p.communicate(timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 2
    assert err.decode().strip().splitlines()[-1] == "mlxdist: error: rank 1 on 127.0.0.1 was killed by signal 9"
    time.sleep(0.5)
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]


def _children(pid: int) -> dict[int, str]:
    import os

    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out[int(d)] = open(f"/proc/{d}/cmdline").read().replace("\0", " ")
            except (OSError, ValueError):
                pass
    return out
