"""Frames for every msgpack channel: the node control plane (cluster/) and the engine<->worker
control channel (runtime/control.py).

A frame is a 4-byte big-endian length, then the body: one msgpack map before the session
starts (at most `MAX_HANDSHAKE_FRAME` bytes), and after `start_session(key)` that map sealed
with ChaCha20-Poly1305 (ciphertext || 16-byte tag, at most `MAX_FRAME` bytes). The 12-byte
nonce is the sender's 4-byte direction label followed by its frame counter as uint64 BE, so
a frame cannot be forged, read, replayed, reordered or reflected back to its sender; every
frame that does not open is a `ProtocolError`. docs/protocol.md has the format.

A closed or broken connection is a `ConnectionError` from `recv` (and an `OSError` from
`send`); a passed deadline is a `TimeoutError`. After a `ProtocolError` the stream is out
of step: close the channel.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

HEADER = struct.Struct(">I")
MAX_HANDSHAKE_FRAME = 4096
MAX_FRAME = 16 << 20  # shard chunks are 1 MiB; 16 MiB leaves room and bounds memory
KEY_BYTES = 32
TAG_BYTES = 16
CLIENT_TO_SERVER = b"c->s"  # the first 4 bytes of the nonce of a frame the client sends
SERVER_TO_CLIENT = b"s->c"


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
    however slowly the peer trickles them. A closed or broken connection is ConnectionError."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed")
            sock.settimeout(left)
        try:
            part = sock.recv(min(n - len(buf), 1 << 20))
        except TimeoutError:
            raise
        except OSError as e:  # reset, or the socket closed under us: the connection is gone
            raise ConnectionError(f"connection lost: {e}") from e
        if not part:
            raise ConnectionError("connection closed by peer")
        buf += part
    return bytes(buf)


def nonce(label: bytes, counter: int) -> bytes:
    """The 12-byte nonce of the `counter`th frame sent in the direction `label`."""
    return label + counter.to_bytes(8, "big")


class Channel:
    """A framed message stream over one socket, sealed once `start_session` is called.
    `send` is thread-safe; `recv` is for one reader at a time."""

    def __init__(self, sock: socket.socket, *, is_client: bool) -> None:
        self.sock = sock
        self.limit = MAX_HANDSHAKE_FRAME
        self.deadline: float | None = None  # time.monotonic() by which every recv must end
        self._send_label = CLIENT_TO_SERVER if is_client else SERVER_TO_CLIENT
        self._recv_label = SERVER_TO_CLIENT if is_client else CLIENT_TO_SERVER
        self._aead: ChaCha20Poly1305 | None = None
        self._send_count = 0
        self._recv_count = 0
        self._send_lock = threading.Lock()

    @property
    def authenticated(self) -> bool:
        return self._aead is not None

    def start_session(self, key: bytes) -> None:
        """Seal every later frame under `key` (32 bytes, used by this connection alone)."""
        if len(key) != KEY_BYTES:
            raise ValueError(f"a session key is {KEY_BYTES} bytes, not {len(key)}")
        self._aead = ChaCha20Poly1305(key)
        self.limit = MAX_FRAME

    def send_raw(self, body: bytes) -> None:
        """Send one message's msgpack bytes, sealed if the session has started."""
        size = len(body) + (TAG_BYTES if self._aead is not None else 0)
        if size > self.limit:
            raise ValueError(f"frame of {size} bytes is over the {self.limit} limit")
        with self._send_lock:  # the counter must follow the order frames go out in
            if self._aead is not None:
                body = self._aead.encrypt(nonce(self._send_label, self._send_count), body, None)
                self._send_count += 1
            self.sock.sendall(HEADER.pack(len(body)) + body)

    def send(self, message: dict[str, Any]) -> bytes:
        """Send `message`; returns its msgpack bytes (the handshakes hash them)."""
        body = pack(message)
        self.send_raw(body)
        return body

    def recv_raw(self) -> bytes:
        """The next message's msgpack bytes, opened if the session has started. A length
        over the limit is refused before its body is read."""
        (length,) = HEADER.unpack(recv_exact(self.sock, HEADER.size, self.deadline))
        if length > self.limit:
            raise ProtocolError(f"frame of {length} bytes is over the {self.limit} limit")
        body = recv_exact(self.sock, length, self.deadline)
        if self._aead is not None:
            try:
                body = self._aead.decrypt(nonce(self._recv_label, self._recv_count), body, None)
            except InvalidTag:
                raise ProtocolError("frame does not open under the session key") from None
            self._recv_count += 1
        return body

    def recv(self) -> dict[str, Any]:
        return unpack(self.recv_raw())

    def close(self) -> None:
        """Close the socket; a thread blocked in `recv` on it gets ConnectionError."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
