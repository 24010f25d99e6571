"""`mlxdist run` as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from runtime_helpers import ROOT, run_cli, tiny_models  # noqa: F401 (fixture)

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
    r = run_cli("run", str(tiny_models["llama"]), "-p", "hi", "-m", "0")  # an empty answer is no answer
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.startswith("mlxdist: error: invalid value for '--max-tokens' / '-m': 0 is not in the range x>=1")
    assert len(r.stderr.splitlines()) == 1
    r = run_cli("run", "/nonexistent/model", "-p", "hi")
    assert r.returncode == 2 and "not a model directory" in r.stderr
    # this machine's MLX has no CUDA: NCCL hand-offs are refused at once, in one line
    r = run_cli("run", str(tiny_models["llama"]), "--ranks", "2", "--handoff", "nccl", "-p", "hi")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "CUDA" in r.stderr


def run_in_tmpdir(tmpdir, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmpdir))
    return subprocess.run([sys.executable, "-m", "mlxdist", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_run_leaves_no_temporary_directory(tiny_models, tmp_path):
    """Worker logs and the hostfile go to a temporary directory, removed at the end (one
    rank runs in process and makes none); the stats line counts ranks in good English."""
    for ranks in ("2", "1"):
        tmpdir = tmp_path / f"tmp{ranks}"
        tmpdir.mkdir()
        r = run_in_tmpdir(tmpdir, "run", str(tiny_models["llama"]), "--ranks", ranks, "-p", "hi", "-m", "3",
                          "--stats")
        assert r.returncode == 0, r.stderr
        assert r.stderr.rstrip().endswith("tok/s, 1 rank]" if ranks == "1" else "tok/s, 2 ranks]"), r.stderr
        assert not list(tmpdir.glob("mlxdist-run-*"))
    # a failure too: rank 1 cannot load its stage (a tensor is missing from its range)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], broken)
    import mlx.core as mx

    (f,) = broken.glob("model*.safetensors")
    weights = {k: v for k, v in mx.load(str(f)).items() if k != "model.layers.5.mlp.up_proj.weight"}
    mx.save_safetensors(str(f), weights, metadata={"format": "mlx"})
    (tmp_path / "tmp-failed").mkdir()
    r = run_in_tmpdir(tmp_path / "tmp-failed", "run", str(broken), "--ranks", "2", "-p", "hi", "-m", "3")
    assert r.returncode == 2 and "rank 1 on 127.0.0.1" in r.stderr and "missing" in r.stderr, r.stderr
    assert not list((tmp_path / "tmp-failed").glob("mlxdist-run-*"))


def test_run_restarts_a_killed_rank_and_cleans_up(tiny_models, tmp_path):
    """`mlxdist run` with a worker SIGKILLed mid-answer: the engine restarts the ranks (a new
    launcher; the old one's temporary directory is removed at once), the answer is the
    uninterrupted one, and at the end no worker and no temporary directory is left."""
    import signal
    import threading

    args = ["run", str(tiny_models["llama"]), "--ranks", "3", "-p", "talk", "--max-tokens", "400"]
    expected = run_cli(*args)
    assert expected.returncode == 0, expected.stderr
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "mlxdist", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, text=True)
    watchdog = threading.Timer(180, p.kill)  # the reads below wait for the end
    watchdog.start()
    try:
        first = p.stdout.read(4)  # it is answering
        workers = _children(p.pid)
        assert len(workers) == 3 and len(list(tmp_path.glob("mlxdist-run-*"))) == 1
        victim = next(pid for pid in workers if os.readlink(f"/proc/{pid}/fd/1").endswith("/rank1.log"))
        os.kill(victim, signal.SIGKILL)
        said = [p.stderr.readline(), p.stderr.readline()]
        assert said[0] == "mlxdist: rank 1 on 127.0.0.1 was killed by signal 9; restarting the ranks\n", said
        assert said[1].startswith("mlxdist: ranks restarted in "), said
        assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
        assert len(list(tmp_path.glob("mlxdist-run-*"))) == 1  # the new group's; the old one's is gone
        out, err = p.stdout.read(), p.stderr.read()  # not communicate(): it skips what read(4) buffered
        p.wait(timeout=60)
    finally:
        watchdog.cancel()
        if p.poll() is None:
            p.kill()
    assert (p.returncode, first + out, err) == (0, expected.stdout, "")
    assert not list(tmp_path.glob("mlxdist-run-*"))


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
