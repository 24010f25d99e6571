"""Bad requests over raw HTTP: each gets a 4xx with OpenAI's error JSON, and the server
keeps serving afterwards."""

from __future__ import annotations

import http.client
import json
import socket

import pytest
from fake_engine import FakeEngine


def post(server, path: str, body, headers: dict | None = None) -> tuple[int, dict]:
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, raw, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data)


CHAT = "/v1/chat/completions"
OK = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}

CASES = [
    (CHAT, {"model": "fake"}, 400, "messages"),
    (CHAT, {"model": "fake", "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": "fake", "messages": []}, 400, "messages"),
    (CHAT, {"model": "fake", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"model": "fake", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {**OK, "model": "gpt-9"}, 404, "model"),
    (CHAT, {**OK, "max_tokens": -1}, 400, "max_tokens"),
    (CHAT, {**OK, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {**OK, "max_tokens": "ten"}, 400, "max_tokens"),
    (CHAT, {**OK, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {**OK, "temperature": 9}, 400, "temperature"),
    (CHAT, {**OK, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {**OK, "stream": "yes"}, 400, "stream"),
    (CHAT, {**OK, "stop": [1, 2]}, 400, "stop"),
    (CHAT, {**OK, "n": 0}, 400, "n"),
    (CHAT, {**OK, "seed": 1.5}, 400, "seed"),
    (CHAT, {**OK, "messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages"),  # context is 256
    (CHAT, [1, 2], 400, None),
    ("/v1/completions", {"model": "fake"}, 400, "prompt"),
    ("/v1/completions", {"model": "fake", "prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"model": "fake", "prompt": [99999]}, 400, "prompt"),
    ("/v1/completions", {"model": "fake", "prompt": "x" * 256}, 400, "prompt"),
]


@pytest.mark.parametrize("path,body,status,param", CASES)
def test_bad_request(server, path, body, status, param):
    got, err = post(server, path, body)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert err["error"]["param"] == param
    if "context" in err["error"]["message"]:
        assert err["error"]["code"] == "context_length_exceeded"


def test_invalid_json_oversized_body_unknown_route(make_server):
    server = make_server(max_body=1000)
    status, err = post(server, CHAT, b"{not json")
    assert status == 400 and err["error"]["code"] == "invalid_json"
    status, err = post(server, CHAT, b"\xff\xfe")
    assert status == 400
    status, err = post(server, CHAT, {**OK, "messages": [{"role": "user", "content": "x" * 2000}]})
    assert status == 413 and err["error"]["code"] == "request_too_large"
    status, err = post(server, "/v1/nothing", OK)
    assert status == 404
    status, body = post(server, CHAT, OK)  # still alive
    assert status == 200 and body["choices"][0]["message"]["content"] == "Answer to hi"


def test_engine_failure_is_a_500_not_a_dead_server(server):
    status, err = post(server, CHAT, {**OK, "messages": [{"role": "user", "content": "fail"}]})
    assert status == 500 and err["error"]["type"] == "server_error"
    assert post(server, CHAT, OK)[0] == 200


def test_garbage_on_the_socket(server):
    host, port = server.address
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        s.recv(1000)
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        s.shutdown(socket.SHUT_WR)  # body cut short
        s.recv(1000)
    assert post(server, CHAT, OK)[0] == 200


def test_queue_full_gets_429(make_server):
    import threading

    engine = FakeEngine(delay=0.05, max_concurrent=1)
    server = make_server(engine, max_queue=1)
    results = []
    threads = [threading.Thread(target=lambda: results.append(post(server, CHAT, OK)[0])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200, 200, 429, 429]
