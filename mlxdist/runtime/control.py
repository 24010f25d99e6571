"""The side channel between the engine and its workers: length-prefixed msgpack frames over
TCP. Control messages only (hello, ready, heartbeats, requests, tokens, errors), never
activations; those go through mx.distributed."""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

import msgpack

MAX_FRAME = 16 << 20
HEARTBEAT_INTERVAL_S = 0.5


class FrameError(Exception):
    pass


class Channel:
    """One TCP connection; `send` is safe from several threads."""

    def __init__(self, sock: socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, obj: dict[str, Any]) -> None:
        data = msgpack.packb(obj, use_bin_type=True)
        with self._lock:
            self.sock.sendall(struct.pack(">I", len(data)) + data)

    def recv(self) -> dict[str, Any] | None:
        """The next frame, or None when the peer has closed the connection."""
        head = self._read(4)
        if head is None:
            return None
        (n,) = struct.unpack(">I", head)
        if n > MAX_FRAME:
            raise FrameError(f"frame of {n} bytes exceeds the {MAX_FRAME} byte limit")
        body = self._read(n)
        if body is None:
            return None
        obj = msgpack.unpackb(body, raw=False)
        if not isinstance(obj, dict):
            raise FrameError("frame is not a map")
        return obj

    def _read(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def connect(address: str, timeout: float = 30.0) -> Channel:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.settimeout(None)
    return Channel(sock)
