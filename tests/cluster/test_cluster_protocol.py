"""The control plane: handshake, refusals, malformed input, fuzzing. The raw client here
follows docs/protocol.md with hashlib/hmac and `cryptography`'s ChaCha20Poly1305 directly,
not the code under test."""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import random
import socket
import struct
import threading
import time

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from mlxdist import PROTOCOL_VERSION
from mlxdist.cluster.client import NodeClient
from mlxdist.framing import Refused
from tests.raw_frames import frame, read_frame

from cluster_fixtures import CLUSTER, SECRET, node  # noqa: F401 (node: fixture)



def transcript(hello: bytes, challenge: bytes) -> bytes:
    return hashlib.sha256(len(hello).to_bytes(4, "big") + hello
                          + len(challenge).to_bytes(4, "big") + challenge).digest()


def mac(secret: bytes, label: bytes, t: bytes) -> bytes:
    return hmac.new(secret, b"mlxdist-auth-v1|" + label + b"|" + t, hashlib.sha256).digest()


class RawClient:
    """A client written from the protocol document."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def hello(self, nonce: bytes | None = None, proto: int = PROTOCOL_VERSION,
              cluster: str = CLUSTER) -> tuple[bytes, dict]:
        body = msgpack.packb({"t": "hello", "proto": proto, "sw": "x", "cluster": cluster,
                              "nonce": nonce or os.urandom(32)})
        self.sock.sendall(frame(body))
        self.challenge_raw = read_frame(self.sock)
        return body, msgpack.unpackb(self.challenge_raw)

    def send(self, message: dict) -> None:
        self.sock.sendall(frame(msgpack.packb(message)))

    def recv(self) -> dict:
        return msgpack.unpackb(read_frame(self.sock))

    def close(self) -> None:
        self.sock.close()


def authenticate(port: int, secret: bytes = SECRET) -> tuple[RawClient, bytes, bytes]:
    c = RawClient(port)
    hello, challenge = c.hello()
    assert challenge["t"] == "challenge"
    t = transcript(hello, c.challenge_raw)
    c.send({"t": "proof", "mac": mac(secret, b"client", t)})
    welcome = c.recv()
    assert welcome["t"] == "welcome"
    assert hmac.compare_digest(welcome["mac"], mac(SECRET, b"server", t))  # node proved itself
    return c, hello, t


def test_raw_client_from_the_spec_gets_status(node):
    c, _, t = authenticate(node.port)
    aead = ChaCha20Poly1305(mac(SECRET, b"session", t))
    for seq in range(2):  # the counters go on: frame 0, then frame 1, each way
        body = msgpack.packb({"t": "status"})
        c.sock.sendall(frame(aead.encrypt(b"c->s" + seq.to_bytes(8, "big"), body, None)))
        reply = read_frame(c.sock)
        assert b"Test Chip" not in reply  # sealed, not only tagged
        status = msgpack.unpackb(aead.decrypt(b"s->c" + seq.to_bytes(8, "big"), reply, None))
        assert status["t"] == "status" and status["node"]["name"] == "n0"
        assert status["node"]["chip"] == "Test Chip"
        assert status["node"]["protocol"] == PROTOCOL_VERSION
    c.close()


def test_client_status_and_ping(node):
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as c:
        assert c.ping()["node_id"] == node.node_id
        s = c.status()
        assert s["node"]["chip"] == "Test Chip" and s["shards"] == []


def test_wrong_secret_is_refused_and_learns_nothing(node):
    c = RawClient(node.port)
    hello, challenge = c.hello()
    c.send({"t": "proof", "mac": mac(b"x" * 40, b"client", transcript(hello, c.challenge_raw))})
    reply = c.recv()
    assert reply == {"t": "refused", "reason": "authentication failed"}
    c.close()
    with pytest.raises(Refused):
        NodeClient("127.0.0.1", node.port, b"y" * 40, CLUSTER)
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as ok:
        assert ok.ping()["t"] == "pong"


@pytest.mark.parametrize("proto,cluster,reason", [
    (PROTOCOL_VERSION + 1, CLUSTER, "protocol version"), (0, CLUSTER, "protocol version"),
    (PROTOCOL_VERSION, "other", "wrong cluster"),
])
def test_wrong_version_or_cluster_refused(node, proto, cluster, reason):
    c = RawClient(node.port)
    _, reply = c.hello(proto=proto, cluster=cluster)
    assert reply["t"] == "refused" and reason in reply["reason"]
    c.close()


def test_replayed_authentication_is_refused(node):
    c, hello, t = authenticate(node.port)
    proof = mac(SECRET, b"client", t)
    c.close()
    # same hello again (same client nonce): refused outright
    r = RawClient(node.port)
    r.sock.sendall(frame(hello))
    assert msgpack.unpackb(read_frame(r.sock))["reason"] == "replayed nonce"
    r.close()
    # a fresh hello with the old proof: the node's new nonce makes the proof worthless
    r = RawClient(node.port)
    r.hello()
    r.send({"t": "proof", "mac": proof})
    assert r.recv()["t"] == "refused"
    r.close()


def test_forged_frame_after_auth_ends_the_connection(node):
    c, _, t = authenticate(node.port)
    body = msgpack.packb({"t": "status"})
    c.sock.sendall(frame(body + b"\0" * 16))  # not sealed: does not open
    with pytest.raises((ConnectionError, OSError)):
        read_frame(c.sock)
    c.close()
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as ok:
        assert ok.ping()["t"] == "pong"


@pytest.mark.parametrize("payload", [
    struct.pack(">I", 1 << 30),  # oversized length
    struct.pack(">I", 5000) + b"x" * 5000,  # over the handshake limit
    frame(b"\xc1\xc1\xc1"),  # not msgpack
    frame(msgpack.packb([1, 2, 3])),  # not a map
    frame(msgpack.packb({"t": 5})),  # type not a string
    frame(msgpack.packb({"t": "status"})),  # before authentication
    frame(msgpack.packb({"t": "hello", "proto": 1, "cluster": CLUSTER, "nonce": "short"})),
    frame(b"\xd4\x05\x00"),  # msgpack extension type
    frame(b"\x91" * 3000),  # deeply nested
])
def test_malformed_frames_refused_node_survives(node, payload):
    s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
    data = b""
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(4096):
            data += chunk
    except (ConnectionResetError, BrokenPipeError):  # closed with our bytes unread: also a refusal
        pass
    except OSError as e:  # closed before our shutdown (a length over the limit is refused at once)
        if e.errno != errno.ENOTCONN:
            raise
    s.close()
    if data:
        assert msgpack.unpackb(data[4:])["t"] == "refused"
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as ok:
        assert ok.ping()["t"] == "pong"


def test_fuzz_random_bytes_then_serves(node):
    rng = random.Random(1234)
    valid_hello = msgpack.packb({"t": "hello", "proto": PROTOCOL_VERSION, "cluster": CLUSTER,
                                 "nonce": b"n" * 32})
    deadline = time.monotonic() + 5.0
    sent = 0
    for _ in range(20000):  # bounded in count and time
        if time.monotonic() > deadline:
            break
        kind = rng.randrange(4)
        if kind == 0:
            data = rng.randbytes(rng.randrange(1, 200))
        elif kind == 1:  # plausible length, random body
            body = rng.randbytes(rng.randrange(0, 300))
            data = frame(body)
        elif kind == 2:  # valid hello then garbage where the proof goes
            data = frame(valid_hello) + rng.randbytes(rng.randrange(1, 100))
        else:  # a mutated valid hello
            b = bytearray(frame(valid_hello))
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            data = bytes(b)
        try:
            s = socket.create_connection(("127.0.0.1", node.port), timeout=2)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(2)
            while s.recv(4096):
                pass
        except OSError:
            pass
        finally:
            s.close()
        sent += 1
    assert sent > 50
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as ok:
        assert ok.status()["node"]["node_id"] == node.node_id


def test_authenticated_garbage_messages_get_errors(node):
    """Well-tagged but nonsensical requests: an error reply each, the session goes on."""
    rng = random.Random(7)
    values = [None, -1, 2**40, "x", "../../etc", b"\0" * 10, [], {}, {"a": 1}, 1.5, True]
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as c:
        for i in range(300):
            kind = rng.choice(["shard_state", "shard_chunk", "shard_commit", "shard_pull",
                               "launch", "job_status", "stop_job", "nope", "status"])
            msg = {"t": kind}
            for key in rng.sample(["model", "stage", "files", "file", "offset", "data", "path",
                                   "job", "rank", "hostfile", "options"], rng.randrange(0, 6)):
                msg[key] = rng.choice(values)
            try:
                c.request(msg)
            except Exception as e:
                assert type(e).__name__ == "RemoteError", e
        assert c.ping()["t"] == "pong"


# -- unauthenticated sockets against a real `mlxdist node` process ------------------------

def closed_by_peer(socks: list[socket.socket], timeout: float) -> tuple[set, dict]:
    """Wait until the node has closed each socket (EOF or reset), at most `timeout` s:
    the ones closed, and what each was sent before (a refusal, or nothing)."""
    import selectors

    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    closed, got = set(), {s: b"" for s in socks}
    deadline = time.monotonic() + timeout
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
            try:
                data = key.fileobj.recv(4096)
            except OSError:  # reset: closed with our bytes unread
                data = b""
            if data:
                got[key.fileobj] += data
            else:
                closed.add(key.fileobj)
                sel.unregister(key.fileobj)
    sel.close()
    return closed, got


def refusal(data: bytes) -> dict | None:
    return msgpack.unpackb(data[4:]) if len(data) > 4 else None


@pytest.fixture
def node_proc(tmp_path):
    from cluster_fixtures import node_process, stop_process

    secret = tmp_path / "secret"
    secret.write_text(SECRET.decode())
    secret.chmod(0o600)
    p, port, _ = node_process(tmp_path / "data", secret)
    try:
        yield port
    finally:
        stop_process(p)


def test_idle_sockets_never_keep_out_an_authenticated_peer(node_proc):
    """100 idle sockets and some stuck in a partial frame, all held open from the client's
    own address: authenticated requests on fresh connections still go through at once, a
    session opened before goes on, and the node closes every held socket (the oldest when
    more come from one address, the rest at the handshake deadline)."""
    port = node_proc
    before = NodeClient("127.0.0.1", port, SECRET, CLUSTER)
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(100)]
    for s in held[-10:]:  # a frame header announcing 100 bytes, then 10 of them
        s.sendall(struct.pack(">I", 100) + b"x" * 10)
    try:
        for _ in range(20):
            with NodeClient("127.0.0.1", port, SECRET, CLUSTER, timeout=5) as c:
                assert c.status()["node"]["name"] == "solo"
        assert before.ping()["t"] == "pong"
        closed, _ = closed_by_peer(held, timeout=5 + 20)
        assert len(closed) == len(held)
        with NodeClient("127.0.0.1", port, SECRET, CLUSTER, timeout=5) as c:
            assert c.ping()["t"] == "pong"
    finally:
        before.close()
        for s in held:
            s.close()


def test_handshake_deadline_closes_a_trickling_peer(node_proc):
    """A peer that sends its hello one byte at a time (each read well within any per-read
    timeout) is refused at the 5 s deadline for the whole handshake, and says so; 100
    idle sockets from another address meanwhile do not push it out."""
    port = node_proc
    trickling = []
    for _ in range(4):
        s = socket.socket()
        try:
            s.bind(("127.0.0.2", 0))
        except OSError:
            s.close()
            pytest.skip("needs a second loopback address (127.0.0.2)")
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        trickling.append(s)
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(100)]
    hello = frame(msgpack.packb({"t": "hello", "proto": PROTOCOL_VERSION, "sw": "x",
                                 "cluster": CLUSTER, "nonce": os.urandom(32)}))
    stop = threading.Event()

    def trickle() -> None:  # a byte each 0.2 s to every socket: 60+ bytes take > 12 s
        for i in range(len(hello)):
            for s in trickling:
                try:
                    s.sendall(hello[i:i + 1])
                except OSError:
                    pass
            if stop.wait(0.2):
                return

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        closed, got = closed_by_peer(trickling, timeout=5 + 20)
        assert len(closed) == len(trickling)
        for s in trickling:
            assert refusal(got[s]) == {"t": "refused",
                                       "reason": "handshake not finished within 5 s"}, got[s]
        with NodeClient("127.0.0.1", port, SECRET, CLUSTER, timeout=5) as c:
            assert c.ping()["t"] == "pong"
    finally:
        stop.set()
        sender.join(timeout=5)
        for s in trickling + held:
            s.close()
