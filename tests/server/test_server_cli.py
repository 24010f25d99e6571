"""`mlxdist serve` / `chat` / `demo` mistakes give one-line errors, never tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_mlxdist(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mlxdist", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def one_line_error(r, text: str) -> None:
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("mlxdist: error: ") and text in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_serve_missing_model_dir(tmp_path):
    one_line_error(run_mlxdist("serve", str(tmp_path / "nope"), timeout=60), "no such model directory")


def test_serve_bad_options(tmp_path):
    one_line_error(run_mlxdist("serve", str(tmp_path), "--local", "0", timeout=60), "--local must be at least 1")
    one_line_error(run_mlxdist("serve", str(tmp_path), "--local", "2", "--nodes", "auto", timeout=60),
                   "not both")


def test_chat_model_and_url(tmp_path):
    one_line_error(run_mlxdist("chat", str(tmp_path), "--url", "http://x", timeout=60), "not both")


def test_serve_bad_port_and_port_in_use(tmp_path):
    import socket

    r = run_mlxdist("serve", str(tmp_path), "--port", "99999")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "99999" in r.stderr, r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        # found before the model loads: the model directory here would not even load
        one_line_error(run_mlxdist("serve", str(tmp_path), "--port", str(port)), f"cannot listen on 127.0.0.1:{port}")


def test_serve_bad_reasoning_budgets_and_missing_verifier(tmp_path):
    one_line_error(run_mlxdist("serve", str(tmp_path), "--reasoning-budgets", "huge=5", timeout=60),
                   "--reasoning-budgets")
    one_line_error(run_mlxdist("serve", str(tmp_path), "--reasoning-budgets", "low=many", timeout=60),
                   "--reasoning-budgets")
    from mlxdist.server.cli import parse_efforts

    assert parse_efforts("low=7, high=99") == {"none": 0, "minimal": 256, "low": 7, "medium": 4096, "high": 99}


def test_serve_plan_refusals(tmp_path):
    """`--plan` gives the stages: `--expert-parallel` beside it is one line; a file that is
    not a plan is one line (before anything loads)."""
    (tmp_path / "plan.json").write_text("not json")
    one_line_error(run_mlxdist("serve", str(tmp_path), "--plan", str(tmp_path / "plan.json"), "--expert-parallel",
                               "--local", "2", timeout=60), "no --expert-parallel with it")
    one_line_error(run_mlxdist("serve", str(tmp_path), "--plan", str(tmp_path / "plan.json"), "--local", "2",
                               timeout=60), "not a plan")
