"""Mutual HMAC-SHA256 challenge-response from the shared cluster secret.

    client -> node   hello     {proto, sw, cluster, nonce_c}
    node   -> client challenge {proto, nonce_n}             (or refused)
    client -> node   proof     {mac = HMAC(K, "client" | T)}
    node   -> client welcome   {mac = HMAC(K, "server" | T)}  (or refused)

T is the SHA-256 of both raw frames (hello and challenge), so each proof is bound to both
fresh nonces, the versions and the cluster name: a recorded proof is useless on a new
connection. The node proves itself only after the client has, so a peer without the secret
learns nothing but "refused". Both sides then derive the session key HMAC(K, "session" | T),
under which every later frame is sealed with ChaCha20-Poly1305 (see mlxdist/framing.py).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import socket
import threading

from mlxdist import PROTOCOL_VERSION, __version__
from mlxdist.framing import Channel, ProtocolError, Refused, unpack

LABEL = b"mlxdist-auth-v1|"
NONCE_BYTES = 32


def _transcript(hello: bytes, challenge: bytes) -> bytes:
    h = hashlib.sha256()
    for part in (hello, challenge):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def _mac(secret: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.digest(secret, LABEL + label + b"|" + transcript, hashlib.sha256)


class NonceLog:
    """Client nonces seen recently; a repeated one is a replay. Bounded in size."""

    def __init__(self, size: int = 65536) -> None:
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def fresh(self, nonce: bytes) -> bool:
        with self._lock:
            if nonce in self._seen:
                return False
            self._seen[nonce] = None
            if len(self._seen) > self._size:
                self._seen.popitem(last=False)
            return True


class Handshakes:
    """Connections accepted but not yet authenticated: at most `per_peer` from one address
    and `total` in all. A new connection past a cap closes the oldest one of its own
    address (past the total: of the address with the most), so idle sockets, however
    many, never keep out a peer that completes the handshake, and one address cannot push
    out another's. Closing is `shutdown`, which wakes the thread reading that socket."""

    def __init__(self, per_peer: int, total: int) -> None:
        self.per_peer, self.total = per_peer, total
        self._pending: dict[socket.socket, str] = {}  # oldest first (insertion order)
        self._lock = threading.Lock()

    def admit(self, sock: socket.socket, peer: str) -> None:
        with self._lock:
            counts = collections.Counter(self._pending.values())
            if counts[peer] >= self.per_peer:
                self._close_oldest(peer)
            elif len(self._pending) >= self.total:
                self._close_oldest(max(counts, key=lambda p: counts[p]))
            self._pending[sock] = peer

    def _close_oldest(self, peer: str) -> None:
        oldest = next(s for s, p in self._pending.items() if p == peer)
        del self._pending[oldest]
        try:
            oldest.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def done(self, sock: socket.socket) -> None:
        """Authenticated, refused or gone: no longer counts (call before closing it)."""
        with self._lock:
            self._pending.pop(sock, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


def _refuse(chan: Channel, reason: str) -> None:
    try:
        chan.send({"t": "refused", "reason": reason})
    except OSError:
        pass
    raise Refused(reason)


def _expect(message: dict, kind: str) -> None:
    if message["t"] == "refused":
        raise Refused(str(message.get("reason", "refused")))
    if message["t"] != kind:
        raise ProtocolError(f"expected {kind!r}, got {message['t']!r}")


def server_handshake(chan: Channel, secret: bytes, cluster: str, nonces: NonceLog) -> dict:
    """Run the node's side; returns the client's hello. Raises Refused/ProtocolError."""
    hello_raw = chan.recv_raw()
    hello = unpack(hello_raw)
    if hello["t"] != "hello":
        _refuse(chan, "expected hello")
    if hello.get("proto") != PROTOCOL_VERSION:
        _refuse(chan, f"protocol version {hello.get('proto')!r} not supported "
                      f"(this node speaks {PROTOCOL_VERSION}, mlxdist {__version__})")
    if hello.get("cluster") != cluster:
        _refuse(chan, "wrong cluster name")
    nonce_c = hello.get("nonce")
    if not isinstance(nonce_c, bytes) or len(nonce_c) != NONCE_BYTES:
        _refuse(chan, "bad nonce")
    if not nonces.fresh(nonce_c):
        _refuse(chan, "replayed nonce")
    challenge_raw = chan.send({"t": "challenge", "proto": PROTOCOL_VERSION,
                               "nonce": secrets.token_bytes(NONCE_BYTES)})
    transcript = _transcript(hello_raw, challenge_raw)
    proof = chan.recv()
    mac = proof.get("mac")
    if proof["t"] != "proof" or not isinstance(mac, bytes) or not hmac.compare_digest(
            mac, _mac(secret, b"client", transcript)):
        _refuse(chan, "authentication failed")
    chan.send({"t": "welcome", "mac": _mac(secret, b"server", transcript)})
    chan.start_session(_mac(secret, b"session", transcript))
    return hello


def client_handshake(chan: Channel, secret: bytes, cluster: str) -> None:
    """Run the client's side; on return the channel is authenticated both ways."""
    hello_raw = chan.send({"t": "hello", "proto": PROTOCOL_VERSION, "sw": __version__,
                           "cluster": cluster, "nonce": secrets.token_bytes(NONCE_BYTES)})
    challenge_raw = chan.recv_raw()
    challenge = unpack(challenge_raw)
    _expect(challenge, "challenge")
    nonce_n = challenge.get("nonce")
    if not isinstance(nonce_n, bytes) or len(nonce_n) != NONCE_BYTES:
        raise ProtocolError("bad nonce from node")
    transcript = _transcript(hello_raw, challenge_raw)
    chan.send({"t": "proof", "mac": _mac(secret, b"client", transcript)})
    welcome = chan.recv()
    _expect(welcome, "welcome")
    mac = welcome.get("mac")
    if not isinstance(mac, bytes) or not hmac.compare_digest(
            mac, _mac(secret, b"server", transcript)):
        raise Refused("the node could not prove it holds the cluster secret")
    chan.start_session(_mac(secret, b"session", transcript))
