"""The HTTP server: the API of routes.py on uvicorn (HTTP/1.1 by h11, asyncio).

One event loop holds every connection, so thousands of idle sockets cost a little memory
each and no thread; what a client may hold is bounded (`HttpLimits`): a connection cap
answered with a 503, a deadline for the request headers, for the body and for idle
keep-alive, a body size limit, and slow readers are dropped.

Why uvicorn + Starlette: the pair that vLLM's OpenAI server (and much of Python's serving)
runs on, kept by the Encode team; h11 is a strict HTTP/1.1 parser (it refuses duplicate
`Content-Length` headers and frames every body, read or not); uvicorn's protocol class is
the documented place to add the per-connection limits it lacks (the connection cap and the
header deadline, below).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import threading
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mlxdist.runtime.api import Engine
from mlxdist.server.routes import MAX_BODY, Api, HttpLimits, build_app

__all__ = ["ApiServer", "HttpLimits", "MAX_BODY", "bind", "raise_fd_limit"]


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, made before the model loads (a port in use fails at once)."""
    if not 0 <= port <= 65535:
        raise OSError(f"port {port} is out of range (0-65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(4096)  # bursts of connections wait here rather than in SYN retries
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def raise_fd_limit(want: int) -> int:
    """Let this process hold `want` open files if the hard limit allows (macOS starts
    processes at 256); returns the soft limit now in force."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return 0


def _canned(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                 "invalid_request_error", "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head + body


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol plus the limits it lacks: at most `limits.max_connections`
    sockets (one more is answered 503 and closed), and a connection with no complete
    request headers `limits.header_timeout_s` after it opened or after its last response
    is closed (slow or silent clients)."""

    limits: HttpLimits = HttpLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = len(self.connections) > self.limits.max_connections
        if self._refused:
            # answer, stop writing, and read (discarding) a moment before closing: closing
            # with the client's request unread would reset the connection and lose the answer
            self.connections.discard(self)
            transport.write(_canned(503, "Service Unavailable", "too many connections to this server; try again "
                                    "shortly", "too_many_connections"))
            if transport.can_write_eof():
                transport.write_eof()
            self.loop.call_later(1.0, transport.close)
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        # +-10% so that sockets opened together (one client's flood) do not all close,
        # and come back, at the same instant
        jitter = 0.9 + 0.2 * random.random()
        self._deadline = self.loop.call_later(self.limits.header_timeout_s * jitter, self._header_deadline)

    def _header_deadline(self) -> None:
        self._deadline = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if not busy and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:  # the same error JSON as the API's
        self.transport.write(_canned(400, "Bad Request", f"invalid HTTP request: {msg}", "invalid_http"))
        self.transport.close()


class ApiServer:
    """Serves one engine. `start()` runs it in a background thread (tests, the demo,
    `mlxdist chat MODEL`, `mlxdist serve`); `shutdown()` stops it."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
                 max_queue: int = 64, max_body: int = MAX_BODY, quiet: bool = False,
                 limits: HttpLimits | None = None, sock: socket.socket | None = None) -> None:
        limits = limits or HttpLimits()
        if max_body != limits.max_body:
            limits = HttpLimits(**{**limits.__dict__, "max_body": max_body})
        self.api = Api(engine, api_key, max_queue, limits, quiet)
        self.engine, self.limits = engine, limits
        self.sock = sock if sock is not None else bind(host, port)
        protocol = type("Protocol", (_GuardedH11,), {"limits": limits})
        config = uvicorn.Config(build_app(self.api), http=protocol, lifespan="off", log_config=None,
                                access_log=False, log_level="warning", timeout_keep_alive=max(1, int(limits.keep_alive_s)),
                                timeout_graceful_shutdown=3, backlog=4096, server_header=False)
        logging.getLogger("uvicorn.error").setLevel(logging.ERROR if quiet else logging.WARNING)
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def metrics(self) -> Any:
        return self.api.metrics

    @property
    def slots(self) -> Any:
        return self.api.slots

    def _run(self) -> None:
        try:
            self.uvicorn.run(sockets=[self.sock])
        except BaseException as e:  # reported by start()
            self._error = e

    def start(self) -> "ApiServer":
        self._thread = threading.Thread(target=self._run, daemon=True, name="api-server")
        self._thread.start()
        while not self.uvicorn.started and self._thread.is_alive():
            self._thread.join(0.01)
        if not self.uvicorn.started:
            raise RuntimeError(f"the HTTP server did not start: {self._error}")
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (True) or `timeout` passes (False)."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
            if self._thread.is_alive():
                self.uvicorn.force_exit = True
                self._thread.join(5)
        self.api.pool.shutdown(wait=False, cancel_futures=True)
        try:
            self.sock.close()
        except OSError:
            pass
