"""`mlxdist serve MODEL --local 2` as a process, hurt the way the reliability issue found
it: a request that used to kill the group, and a rank killed by PID mid-stream. The
service stays up, the stream finishes with the uninterrupted text, /health tells the truth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from test_server_serve_cli import free_port, wait_health, worker_ranks

ROOT = Path(__file__).resolve().parents[2]


def health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def rank_pid(proc: subprocess.Popen, rank: int) -> int:
    return worker_ranks(proc.pid)[rank]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tools"))
    from tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("heal") / "tiny", arch="llama", layers=4, seed=3)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "mlxdist", "serve", str(model), "--port", str(port),
                             "--local", "2", "--quiet"], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, proc)
        yield url, model, proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def _stream(client: openai.OpenAI, on_first=None) -> str:
    text, first = "", True
    for ch in client.completions.create(model="tiny", prompt="once upon a time", max_tokens=120,
                                        temperature=0, stream=True):
        text += ch.choices[0].text
        if first and ch.choices[0].text and on_first:
            on_first()
            first = False
    return text


def test_sampling_that_used_to_kill_the_group(served):
    url, model, proc = served
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    from tiny_models import VOCAB as vocab  # the whole vocabulary: filters nothing, refused before
    with pytest.raises(openai.BadRequestError, match="top_k"):
        c.completions.create(model="tiny", prompt="hi", max_tokens=4, extra_body={"top_k": 1 << 20})
    for extra in ({"top_k": vocab}, {"seed": (1 << 64) - 1}, {"seed": -(1 << 62)}):
        r = c.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0.8, extra_body=extra)
        assert r.usage.completion_tokens >= 1
    assert health(url)[0] == 200
    assert proc.poll() is None


def test_a_killed_rank_heals_and_the_stream_finishes_unchanged(served):
    url, model, proc = served
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=180)
    reference = _stream(c)
    victim = rank_pid(proc, 1)
    t_kill: list[int] = []

    def kill() -> None:
        t_kill.append(victim)
        os.kill(victim, signal.SIGKILL)

    assert _stream(c, on_first=kill) == reference
    assert t_kill  # the kill happened mid-stream
    status, body = health(url)
    assert status == 200 and body["status"] == "ok", body  # healed (tools/soak.py times it)
    assert rank_pid(proc, 1) != victim
    assert _stream(c) == reference
