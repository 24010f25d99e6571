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
import contextlib
import json
import logging
import random
import socket
import threading
from dataclasses import replace
from typing import Iterator

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mlxdist.runtime.api import Engine
from mlxdist.server.routes import build_app
from mlxdist.server.state import MAX_BODY, Api, HttpLimits

__all__ = ["ApiServer", "HttpLimits", "MAX_BODY", "bind", "fd_limit_only_raised", "raise_fd_limit"]


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


LINGER_MAX = 64  # refused connections that may wait (0.25 s) for their 503 to be read
FD_RESERVE = 256  # descriptors kept for everything but client sockets (ranks, shards, logs)


def raise_fd_limit(want: int) -> int:
    """Let this process hold `want` open files if it may (macOS starts processes at 256,
    and importing mlx-lm sets 2048 soft / 4096 hard); raises the hard limit too where
    privileged. Returns the soft limit now in force (0: unknown)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft >= want:
            return soft if soft != resource.RLIM_INFINITY else want
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard) if hard != resource.RLIM_INFINITY
                                                        else hard))
        except (ValueError, OSError):  # not privileged: as far as the hard limit goes
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return 0


@contextlib.contextmanager
def fd_limit_only_raised() -> Iterator[None]:
    """While inside, setrlimit(RLIMIT_NOFILE) may raise the open-file limits but not lower
    them: importing mlx_lm.utils sets them to 2048 soft / 4096 hard, and a lowered hard
    limit cannot be raised again without privileges, which would cap a server's sockets."""
    import resource

    setrlimit = resource.setrlimit

    def raise_only(which: int, limits: tuple[int, int]) -> None:
        if which != resource.RLIMIT_NOFILE:
            return setrlimit(which, limits)
        soft, hard = resource.getrlimit(which)
        inf = resource.RLIM_INFINITY
        new_hard = inf if inf in (hard, limits[1]) else max(hard, limits[1])
        new_soft = inf if inf in (soft, limits[0]) else max(soft, limits[0])
        if new_hard != inf and new_soft > new_hard:
            new_soft = new_hard
        setrlimit(which, (new_soft, new_hard))

    resource.setrlimit = raise_only  # type: ignore[assignment]
    try:
        yield
    finally:
        resource.setrlimit = setrlimit  # type: ignore[assignment]


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
    lingering = 0  # refused connections waiting to close (all servers of this process)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = len(self.connections) > self.limits.max_connections
        if self._refused:
            # answer, stop writing, and read (discarding) a moment before closing: closing
            # with the client's request unread would reset the connection and lose the
            # answer. Only a few linger at once: each holds a file descriptor.
            self.connections.discard(self)
            transport.write(_canned(503, "Service Unavailable", "too many connections to this server; try again "
                                    "shortly", "too_many_connections"))
            if _GuardedH11.lingering >= LINGER_MAX or not transport.can_write_eof():
                transport.close()
                return
            transport.write_eof()
            _GuardedH11.lingering += 1
            self.loop.call_later(0.25, self._close_refused)
            return
        self._arm()

    def _close_refused(self) -> None:
        _GuardedH11.lingering -= 1
        self.transport.close()

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
                 limits: HttpLimits | None = None, sock: socket.socket | None = None,
                 verifier: Engine | None = None, efforts: dict[str, int] | None = None) -> None:
        limits = limits or HttpLimits()
        if max_body != limits.max_body:
            limits = replace(limits, max_body=max_body)
        # the connection cap must stay under the open-file limit: past it, accept() fails
        # and asyncio stops accepting anyone, /health included, for a second at a time
        fds = raise_fd_limit(limits.max_connections + FD_RESERVE)
        if fds and limits.max_connections > fds - FD_RESERVE:
            limits = replace(limits, max_connections=max(1, fds - FD_RESERVE))
        self.api = Api(engine, api_key, max_queue, limits, quiet, verifier, efforts)
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
