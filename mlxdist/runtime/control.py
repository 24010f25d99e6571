"""The side channel between the engine and its workers: `framing.Channel` frames over TCP,
sealed with ChaCha20-Poly1305. Control messages only (hello, ready, heartbeats, requests
with their prompts and sampling parameters, tokens, errors), never activations; those go
through mx.distributed.

The engine makes one group key K (32 random bytes; `WorkerSpec.session` is its 64 hex
characters) and gives it to every rank. So that no two connections seal under the same
key, each connection derives its own from two fresh nonces:

    engine -> worker  {"t": "challenge", "nonce": Ne}     (clear)
    worker -> engine  {"t": "answer", "nonce": Nw}        (clear)
    key = HMAC-SHA256(K, "mlxdist-control-v1|" || Ne || Nw)
    worker -> engine  {"t": "hello", "rank", "host", "pid"}  (the first sealed frame)

The worker is the channel's client. A hello that does not open means the peer does not
hold K: the engine drops the connection (`accept` raises ProtocolError); a worker that
cannot open the engine's first frame exits the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import time

from mlxdist.framing import Channel, ProtocolError

HEARTBEAT_INTERVAL_S = 0.5
HANDSHAKE_TIMEOUT_S = 10.0  # from accept to the worker's hello
LABEL = b"mlxdist-control-v1|"
NONCE_BYTES = 32


def connection_key(group_key: bytes, engine_nonce: bytes, worker_nonce: bytes) -> bytes:
    """The key that seals one connection's frames: fresh for every pair of nonces."""
    return hmac.digest(group_key, LABEL + engine_nonce + worker_nonce, hashlib.sha256)


def _nonce(message: dict, kind: str) -> bytes:
    value = message.get("nonce")
    if message["t"] != kind or not isinstance(value, bytes) or len(value) != NONCE_BYTES:
        raise ProtocolError(f"expected a {kind} with a {NONCE_BYTES}-byte nonce")
    return value


def connect(address: str, group_key: bytes, timeout: float = 30.0) -> Channel:
    """The worker's side: dial the engine at HOST:PORT and set up the sealed channel. The
    caller's first message must be its hello."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chan = Channel(sock, is_client=True)
    try:
        chan.deadline = time.monotonic() + timeout
        engine_nonce = _nonce(chan.recv(), "challenge")
        worker_nonce = secrets.token_bytes(NONCE_BYTES)
        chan.send({"t": "answer", "nonce": worker_nonce})
        chan.start_session(connection_key(group_key, engine_nonce, worker_nonce))
    except BaseException:
        chan.close()
        raise
    chan.deadline = None
    sock.settimeout(None)
    return chan


def accept(sock: socket.socket, group_key: bytes,
           timeout: float = HANDSHAKE_TIMEOUT_S) -> tuple[Channel, dict]:
    """The engine's side, for a socket just accepted: the sealed channel and the worker's
    hello. ProtocolError if the peer does not hold the group key or says something else,
    ConnectionError or TimeoutError if it goes or stalls; the socket is closed then."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chan = Channel(sock, is_client=False)
    try:
        chan.deadline = time.monotonic() + timeout
        engine_nonce = secrets.token_bytes(NONCE_BYTES)
        chan.send({"t": "challenge", "nonce": engine_nonce})
        worker_nonce = _nonce(chan.recv(), "answer")
        chan.start_session(connection_key(group_key, engine_nonce, worker_nonce))
        hello = chan.recv()
        if hello["t"] != "hello" or not isinstance(hello.get("rank"), int):
            raise ProtocolError("expected a hello with an int rank")
    except BaseException:
        chan.close()
        raise
    chan.deadline = None
    sock.settimeout(None)
    return chan, hello
