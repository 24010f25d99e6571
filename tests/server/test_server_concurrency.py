"""Many clients at once, and clients that leave mid-stream, over the fake engine (the real
model versions are in test_server_real.py)."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
from fake_engine import FakeEngine


def metric(server, name: str) -> float:
    with urllib.request.urlopen(server.url + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise KeyError(name)


def test_eight_clients_each_get_their_own_answer(make_server):
    engine = FakeEngine(delay=0.005, max_concurrent=4)
    server = make_server(engine)
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

    def ask(i: int) -> tuple[int, str]:
        if i % 2:
            stream = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": f"q{i}"}],
                                               stream=True)
            return i, "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        r = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": f"q{i}"}])
        return i, r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = dict(pool.map(ask, range(8)))
    assert answers == {i: f"Answer to q{i}" for i in range(8)}
    assert engine.peak <= 4  # never more in the engine than its slots; the rest waited
    assert metric(server, "mlxdist_active_requests") == 0


def test_client_leaving_mid_stream_frees_its_slot(make_server):
    engine = FakeEngine(delay=0.2, max_concurrent=1)
    server = make_server(engine)
    body = {"model": "fake", "messages": [{"role": "user", "content": "a long question"}], "stream": True}
    sock = socket.create_connection(server.address, timeout=10)
    raw = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(raw), raw))
    got = b""
    while got.count(b"data:") < 2:  # the role chunk and a first token
        got += sock.recv(4096)
    assert metric(server, "mlxdist_active_requests") == 1
    t0 = time.monotonic()
    sock.close()
    while metric(server, "mlxdist_active_requests") and time.monotonic() - t0 < 5:
        time.sleep(0.02)
    assert metric(server, "mlxdist_active_requests") == 0
    assert engine.stats()["active"] == 0  # the engine's request was cancelled, not left running
    assert metric(server, "mlxdist_requests_cancelled_total") == 1
    # the one slot is free again: a new request is served at once
    engine.delay = 0.0
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "next"}])
    assert r.choices[0].message.content == "Answer to next"


def test_client_leaving_a_whole_request_cancels_it(make_server):
    engine = FakeEngine(delay=0.2, max_concurrent=1)
    server = make_server(engine)
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    body = {"model": "fake", "messages": [{"role": "user", "content": "slow"}]}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    time.sleep(0.3)
    conn.sock.close()
    t0 = time.monotonic()
    while engine.stats()["active"] and time.monotonic() - t0 < 5:
        time.sleep(0.02)
    assert engine.stats()["active"] == 0
    assert time.monotonic() - t0 < 2  # long before the 3 s the answer would take


def test_metrics_text(server):
    openai.OpenAI(base_url=server.url + "/v1", api_key="x").completions.create(model="fake", prompt="ab")
    with urllib.request.urlopen(server.url + "/metrics") as r:
        text = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/plain")
    assert 'mlxdist_requests_total{endpoint="/v1/completions",status="200"} 1' in text
    assert "mlxdist_completion_tokens_total 13" in text  # "Answer to ab" + EOS
    assert "mlxdist_prompt_tokens_total 2" in text
    assert "mlxdist_engine_stage0_seconds 0.25" in text
    assert "mlxdist_queued_requests 0" in text and "mlxdist_tokens_per_second" in text
    assert "mlxdist_time_to_first_token_seconds_count 1" in text
