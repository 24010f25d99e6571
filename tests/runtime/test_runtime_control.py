"""The engine<->worker control channel (runtime/control.py) on loopback: the key derivation
of docs/protocol.md, written here with hmac and `cryptography` directly, and a worker
without the group key refused."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import threading

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from mlxdist.framing import ProtocolError
from mlxdist.runtime import control
from tests.raw_frames import frame, read_frame

GROUP_KEY = os.urandom(32)


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    yield server, f"127.0.0.1:{server.getsockname()[1]}"
    server.close()


def in_thread(fn):
    """Run `fn` in a thread; returns a function that joins it and gives its result or
    raises its exception."""
    out: dict = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()

    def result():
        t.join(10)
        if "error" in out:
            raise out["error"]
        return out["value"]
    return result


def test_a_worker_written_from_the_doc_is_accepted(listener):
    server, _ = listener
    hello = {"t": "hello", "rank": 1, "host": "h1", "pid": 42}

    def raw_worker():
        s = socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=10)
        challenge = msgpack.unpackb(read_frame(s))
        assert challenge["t"] == "challenge" and len(challenge["nonce"]) == 32
        worker_nonce = os.urandom(32)
        s.sendall(frame(msgpack.packb({"t": "answer", "nonce": worker_nonce})))
        key = hmac.new(GROUP_KEY, b"mlxdist-control-v1|" + challenge["nonce"] + worker_nonce,
                       hashlib.sha256).digest()
        aead = ChaCha20Poly1305(key)
        s.sendall(frame(aead.encrypt(b"c->s" + (0).to_bytes(8, "big"), msgpack.packb(hello), None)))
        reply = read_frame(s)
        assert b"secret prompt" not in reply
        s.close()
        return msgpack.unpackb(aead.decrypt(b"s->c" + (0).to_bytes(8, "big"), reply, None))

    worker = in_thread(raw_worker)
    sock, _ = server.accept()
    chan, got = control.accept(sock, GROUP_KEY)
    assert got == hello
    chan.send({"t": "add", "prompt": "a secret prompt"})
    assert worker() == {"t": "add", "prompt": "a secret prompt"}
    chan.close()


def test_connect_and_accept_talk_both_ways(listener):
    server, address = listener

    def worker():
        chan = control.connect(address, GROUP_KEY)
        chan.send({"t": "hello", "rank": 0, "host": "h0", "pid": 1})
        chan.send({"t": "token", "text": "hi"})
        got = chan.recv()
        chan.close()
        return got

    result = in_thread(worker)
    sock, _ = server.accept()
    chan, hello = control.accept(sock, GROUP_KEY)
    assert hello["rank"] == 0
    assert chan.recv() == {"t": "token", "text": "hi"}
    chan.send({"t": "stop"})
    assert result() == {"t": "stop"}
    with pytest.raises(ConnectionError):  # the worker closed: the engine's reader sees it
        chan.recv()
    chan.close()


def test_a_worker_with_the_wrong_key_is_refused(listener):
    server, address = listener

    def worker():
        chan = control.connect(address, os.urandom(32))
        chan.send({"t": "hello", "rank": 0, "host": "h0", "pid": 1})
        return chan.recv()  # the engine drops the connection

    result = in_thread(worker)
    sock, _ = server.accept()
    with pytest.raises(ProtocolError, match="does not open"):
        control.accept(sock, GROUP_KEY)
    with pytest.raises(ConnectionError):
        result()


def test_an_engine_with_the_wrong_key_is_not_believed(listener):
    """The worker cannot open the engine's first sealed frame: ProtocolError, and its
    reader exits the process on that."""
    server, address = listener

    def engine():
        sock, _ = server.accept()
        chan, _ = control.accept(sock, GROUP_KEY)
        return chan

    accepted = in_thread(engine)
    chan = control.connect(address, GROUP_KEY)
    chan.send({"t": "hello", "rank": 0, "host": "h0", "pid": 1})
    engine_chan = accepted()
    other = ChaCha20Poly1305(os.urandom(32))  # a frame sealed under some other key
    engine_chan.sock.sendall(frame(other.encrypt(b"s->c" + bytes(8), msgpack.packb({"t": "stop"}), None)))
    with pytest.raises(ProtocolError):
        chan.recv()
    chan.close()
    engine_chan.close()


def test_a_stranger_that_says_nothing_or_garbage_is_dropped(listener):
    server, _ = listener
    s = socket.create_connection(("127.0.0.1", server.getsockname()[1]))
    sock, _ = server.accept()
    with pytest.raises(TimeoutError):
        control.accept(sock, GROUP_KEY, timeout=0.3)
    s.close()
    s = socket.create_connection(("127.0.0.1", server.getsockname()[1]))
    s.sendall(frame(msgpack.packb({"t": "answer", "nonce": b"short"})))
    sock, _ = server.accept()
    with pytest.raises(ProtocolError):
        control.accept(sock, GROUP_KEY)
    s.close()
