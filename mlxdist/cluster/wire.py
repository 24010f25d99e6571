"""Frames on the control plane: a 4-byte big-endian length, then one msgpack map.

Before authentication a frame may be at most `MAX_HANDSHAKE_FRAME` bytes; after it, every
frame starts with a 32-byte HMAC-SHA256 tag over (direction, sequence number, body) under
the session key, so a frame cannot be forged, replayed, reordered or moved to the other
direction. Anything that does not parse is a `ProtocolError`, never a crash.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import time
from typing import Any

import msgpack

HEADER = struct.Struct(">I")
MAX_HANDSHAKE_FRAME = 4096
MAX_FRAME = 16 << 20  # shard chunks are 1 MiB; 16 MiB leaves room and bounds memory
TAG_BYTES = 32


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame or message."""


class Refused(Exception):
    """The peer refused us (wrong secret, wrong version, wrong cluster...)."""


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} not allowed")


def unpack(body: bytes) -> dict[str, Any]:
    """Decode one message: a map with string keys and a string "t" (its type)."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_no_ext,
                                  timestamp=0)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many types on garbage; all mean "malformed"
        raise ProtocolError(f"malformed frame: {type(e).__name__}") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise ProtocolError("a message must be a map with a string 't'")
    return message


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """`n` bytes; with a `deadline` (time.monotonic()), all of them by then or TimeoutError,
    however slowly the peer trickles them."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed")
            sock.settimeout(left)
        part = sock.recv(min(n - len(buf), 1 << 20))
        if not part:
            raise ConnectionError("connection closed by peer")
        buf += part
    return bytes(buf)


class Channel:
    """A framed, optionally authenticated, message stream over one TCP socket.
    Not thread-safe: one request at a time (callers hold their own lock)."""

    def __init__(self, sock: socket.socket, *, is_client: bool) -> None:
        self.sock = sock
        self.is_client = is_client
        self.limit = MAX_HANDSHAKE_FRAME
        self._key: bytes | None = None
        self._send_seq = 0
        self._recv_seq = 0
        self.deadline: float | None = None  # time.monotonic() by which every recv must end

    @property
    def authenticated(self) -> bool:
        return self._key is not None

    def start_session(self, key: bytes) -> None:
        self._key = key
        self.limit = MAX_FRAME

    def _tag(self, outgoing: bool, seq: int, body: bytes) -> bytes:
        from_client = outgoing == self.is_client
        direction = b"c>s" if from_client else b"s>c"
        assert self._key is not None
        return hmac.digest(self._key, direction + seq.to_bytes(8, "big") + body, hashlib.sha256)

    def send_raw(self, body: bytes) -> None:
        if self._key is not None:
            body = self._tag(True, self._send_seq, body) + body
            self._send_seq += 1
        if len(body) > MAX_FRAME:
            raise ValueError(f"frame of {len(body)} bytes is over the {MAX_FRAME} limit")
        self.sock.sendall(HEADER.pack(len(body)) + body)

    def send(self, message: dict[str, Any]) -> bytes:
        body = pack(message)
        self.send_raw(body)
        return body

    def recv_raw(self) -> bytes:
        (length,) = HEADER.unpack(recv_exact(self.sock, HEADER.size, self.deadline))
        if length > self.limit:
            raise ProtocolError(f"frame of {length} bytes is over the {self.limit} limit")
        body = recv_exact(self.sock, length, self.deadline)
        if self._key is not None:
            if len(body) < TAG_BYTES:
                raise ProtocolError("frame too short for its tag")
            tag, body = body[:TAG_BYTES], body[TAG_BYTES:]
            if not hmac.compare_digest(tag, self._tag(False, self._recv_seq, body)):
                raise ProtocolError("frame tag does not verify")
            self._recv_seq += 1
        return body

    def recv(self) -> dict[str, Any]:
        return unpack(self.recv_raw())

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
