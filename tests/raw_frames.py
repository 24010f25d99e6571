"""Frames as docs/protocol.md defines them, written and read with the standard library
only: the reference the channel tests check `mlxdist.framing` against."""

from __future__ import annotations

import socket
import struct


def frame(body: bytes) -> bytes:
    """A 4-byte big-endian length, then the body."""
    return struct.pack(">I", len(body)) + body


def read_frame(sock: socket.socket) -> bytes:
    """The next frame's body; ConnectionError if the peer closes first."""
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = sock.recv(n - len(buf))
            if not part:
                raise ConnectionError("closed")
            buf += part
        return buf
    (n,) = struct.unpack(">I", exact(4))
    return exact(n)
