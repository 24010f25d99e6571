"""`mlxdist run` as a user runs it."""

from __future__ import annotations

from runtime_helpers import run_cli

from mlxdist.runtime.engine import open_engine


def test_run_two_ranks_streams_the_answer(tiny_models):
    path = tiny_models["llama"]
    with open_engine(path) as eng:
        tokens = eng.generate(eng.encode_chat([{"role": "user", "content": "hi"}]), max_tokens=6)
        expected = eng.tokenizer.decode(tokens)
    r = run_cli("run", str(path), "--ranks", "2", "--split", "4,2", "-p", "hi", "--max-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected


def test_run_refuses_bad_input(tiny_models):
    r = run_cli("run", str(tiny_models["llama"]), "--ranks", "2", "--split", "4,4", "-p", "hi")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "mlxdist: error: split 4,4 must have 2 positive entries summing to the model's 6 layers"]
    r = run_cli("run", "/nonexistent/model", "-p", "hi")
    assert r.returncode == 2 and "not a model directory" in r.stderr
