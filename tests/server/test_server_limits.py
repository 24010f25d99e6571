"""What a careless or hostile client may hold is bounded, and one bad request never
reaches the engine or another request: raw sockets against the real HTTP server over the
fake engine."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
from fake_engine import FakeEngine
from test_server_errors import post as post_raw

from mlxdist.runtime.api import Health
from mlxdist.server.app import HttpLimits

CHAT = "/v1/chat/completions"
OK = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def post(server, body, headers: dict | None = None, path: str = CHAT) -> tuple[int, dict]:
    return post_raw(server, path, body, headers)


def get(server, path: str) -> tuple[int, dict]:
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data)


def read_responses(sock: socket.socket, timeout: float = 10.0) -> list[tuple[int, bytes]]:
    """Every HTTP response on the socket until the server closes it (or `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except socket.timeout:
        pass
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        out.append((status, rest[:length]))
        data = rest[length:]
    return out


@pytest.mark.parametrize("change,status,param", [
    ({"top_k": 257}, 400, "top_k"),  # over the vocabulary (the fake has 256 tokens)
    ({"top_k": 1 << 20}, 400, "top_k"),
    ({"seed": 1 << 70}, 400, "seed"),
    ({"seed": -(1 << 64)}, 400, "seed"),
    ({"top_k": 256}, 200, None),  # the whole vocabulary: allowed, filters nothing
    ({"seed": (1 << 64) - 1}, 200, None),
])
def test_sampling_limits_checked_at_the_api(server, change, status, param):
    got, body = post(server, {**OK, **change})
    assert got == status, body
    if status != 200:
        assert body["error"]["param"] == param
    assert post(server, OK)[0] == 200


def test_deeply_nested_json_is_a_400(server):
    status, body = post(server, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert post(server, OK)[0] == 200


@pytest.mark.parametrize("framing", [b"Content-Length: %d\r\nContent-Length: 5", b"Content-Length: %d, 5",
                                     b"Content-Length: %d\r\nTransfer-Encoding: chunked"])
def test_ambiguous_framing_is_refused(server, framing):
    """Two lengths, or a length and chunked: a smuggling attempt, refused (identical
    duplicates are one length, as RFC 9112 allows)."""
    raw = json.dumps(OK).encode()
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + framing % len(raw) + b"\r\n\r\n" + raw)
        (status, body), = read_responses(s)  # and the connection is closed
    assert status in (400, 411) and json.loads(body)["error"]["message"]


def test_a_refused_request_body_is_never_read_as_the_next_request(make_server):
    """With a wrong key the body is still framed by its Content-Length: a body that looks
    like a request is not answered as one."""
    server = make_server(api_key="sesame")
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled)
                  + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        responses = read_responses(s)
    assert [st for st, _ in responses] == [401, 200]
    assert json.loads(responses[1][1])["status"] == "ok"  # the health answer, not the models list


def test_idle_and_half_sent_connections_hold_nothing(make_server):
    """Hundreds of sockets that send nothing, or headers without their end, or headers
    without the body: the API still answers, and the server closes each of them at its
    deadline (headers, then body: 408)."""
    server = make_server(limits=HttpLimits(header_timeout_s=1.0, body_timeout_s=1.0))
    idle = [socket.create_connection(server.address, timeout=30) for _ in range(300)]
    partial = [socket.create_connection(server.address, timeout=30) for _ in range(100)]
    for s in partial:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    bodiless = socket.create_connection(server.address, timeout=30)
    bodiless.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    try:
        assert get(server, "/health")[0] == 200
        assert post(server, OK)[1]["choices"][0]["message"]["content"] == "Answer to hi"
        for s in idle + partial:
            assert s.recv(100) == b""  # closed by the server
        (status, body), = read_responses(bodiless, timeout=30)
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    finally:
        for s in idle + partial + [bodiless]:
            s.close()
    assert post(server, OK)[0] == 200


def test_idle_keep_alive_connections_are_closed(make_server):
    server = make_server(limits=HttpLimits(keep_alive_s=1.0))
    with socket.create_connection(server.address, timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        responses = read_responses(s, timeout=30)  # one answer, then the server closes
    assert [st for st, _ in responses] == [200]


def test_over_the_connection_cap_is_a_polite_503(make_server):
    server = make_server(limits=HttpLimits(max_connections=20, header_timeout_s=60))
    held = [socket.create_connection(server.address, timeout=30) for _ in range(20)]
    try:
        with socket.create_connection(server.address, timeout=30) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            (status, body), = read_responses(s)
        assert status == 503 and json.loads(body)["error"]["code"] == "too_many_connections"
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 30
    while True:  # the held sockets' closing reaches the server in its own time
        try:
            if get(server, "/health")[0] == 200:
                break
        except (http.client.HTTPException, OSError):
            pass
        assert time.monotonic() < deadline
        time.sleep(0.05)


class _CountingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.encoded = 0
        inner = self.tokenizer.encode

        def encode(text: str, add_special_tokens: bool = True) -> list[int]:
            self.encoded += 1
            return inner(text)

        self.tokenizer.encode = encode  # type: ignore[method-assign]


def test_a_huge_prompt_is_refused_before_tokenizing(make_server):
    engine = _CountingEngine()
    server = make_server(engine)
    status, body = post(server, {"model": "fake", "prompt": "x" * 3_000_000}, path="/v1/completions")
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert engine.encoded == 0
    status, body = post(server, {"model": "fake", "prompt": "hello"}, path="/v1/completions")
    assert status == 200 and engine.encoded == 1


class _SickEngine(FakeEngine):
    status = Health("ok")

    def health(self) -> Health:
        return self.status


def test_health_tells_the_truth(make_server):
    engine = _SickEngine()
    server = make_server(engine)
    assert get(server, "/health") == (200, {"status": "ok", "model": "fake", "uptime_s": pytest.approx(0, abs=60)})
    engine.status = Health("degraded", "restarting the ranks after: rank 1 was killed")
    status, body = get(server, "/health")
    assert status == 503 and body["status"] == "degraded" and "rank 1" in body["reason"]
    engine.status = Health("down", "crash loop")
    assert get(server, "/health")[0] == 503


def test_mlx_lm_import_cannot_lower_the_open_file_limit():
    """mlx_lm.utils sets RLIMIT_NOFILE to (2048, 4096) when imported; `mlxdist serve`
    imports it under fd_limit_only_raised, so a server keeps the limits it had (or more)."""
    import resource

    from mlxdist.server.app import fd_limit_only_raised

    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    with fd_limit_only_raised():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 2048))  # what a lowering import does
        during = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, before)  # (soft may have been raised)
    assert during[1] == before[1] and (during[0] >= before[0] or during[0] == resource.RLIM_INFINITY)


def test_work_asked_for_after_shutdown_is_a_503_not_a_traceback():
    """A request still at work when the server shuts its pool down (a search between two
    steps) ends with a 503 ApiError; the pool's own refusal is Python's RuntimeError."""
    import asyncio

    from mlxdist.server.protocol import ApiError
    from mlxdist.server.state import Api

    api = Api(FakeEngine(), None, 4, HttpLimits(), quiet=True)
    assert asyncio.run(api.run(lambda x: x + 1, 1)) == 2
    api.pool.shutdown(wait=True, cancel_futures=True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        api.pool.submit(lambda: None)
    with pytest.raises(ApiError) as e:
        asyncio.run(api.run(lambda: None))
    assert e.value.status == 503
