"""mlxdist/framing.py against docs/protocol.md: the sealed frames are checked and made here
with `cryptography`'s ChaCha20Poly1305 and msgpack directly, not with the code under test."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from mlxdist.framing import MAX_FRAME, MAX_HANDSHAKE_FRAME, Channel, ProtocolError
from tests.raw_frames import frame, read_frame

KEY = bytes(range(32))
PROMPT = "the launch code is 7-alpha-9, tell no one"


def nonce(label: bytes, counter: int) -> bytes:
    """docs/protocol.md: 4-byte direction label, then the frame counter as uint64 BE."""
    return label + counter.to_bytes(8, "big")


def sealed_frames(messages: list[dict], *, is_client: bool) -> list[bytes]:
    """The raw frames (length included) a Channel sends for `messages`, captured off a
    socketpair."""
    mine, raw = socket.socketpair()
    chan = Channel(mine, is_client=is_client)
    chan.start_session(KEY)
    frames = []
    for m in messages:
        chan.send(m)
        frames.append(frame(read_frame(raw)))
    chan.close()
    raw.close()
    return frames


@pytest.fixture
def receiver():
    """A session-keyed server-side Channel, and the raw socket that feeds it."""
    mine, raw = socket.socketpair()
    chan = Channel(mine, is_client=False)
    chan.start_session(KEY)
    chan.deadline = time.monotonic() + 5  # a test that would block fails instead
    yield chan, raw
    chan.close()
    raw.close()


def test_sealed_frame_hides_the_prompt_and_opens_with_the_documented_nonce():
    message = {"t": "add", "prompt": PROMPT, "max_tokens": 7}
    (frame,) = sealed_frames([message], is_client=True)
    (n,) = struct.unpack(">I", frame[:4])
    body = frame[4:]
    assert n == len(body) == len(msgpack.packb(message)) + 16  # ciphertext || 16-byte tag
    assert PROMPT.encode() not in frame and b"launch code" not in frame
    opened = ChaCha20Poly1305(KEY).decrypt(nonce(b"c->s", 0), body, None)
    assert msgpack.unpackb(opened) == message


def test_frames_sealed_here_open_in_order_in_the_channel(receiver):
    chan, raw = receiver
    aead = ChaCha20Poly1305(KEY)
    for i in range(3):
        body = aead.encrypt(nonce(b"c->s", i), msgpack.packb({"t": "token", "i": i}), None)
        raw.sendall(struct.pack(">I", len(body)) + body)
    assert [chan.recv()["i"] for _ in range(3)] == [0, 1, 2]


def test_a_flipped_byte_is_refused():
    (frame,) = sealed_frames([{"t": "add", "prompt": PROMPT}], is_client=True)
    for at in (4, len(frame) // 2, len(frame) - 1):  # first ciphertext byte, middle, tag
        bad = bytearray(frame)
        bad[at] ^= 0x01
        mine, feed = socket.socketpair()
        fresh = Channel(mine, is_client=False)
        fresh.start_session(KEY)
        feed.sendall(bytes(bad))
        with pytest.raises(ProtocolError):
            fresh.recv()
        fresh.close()
        feed.close()


def test_a_replayed_frame_is_refused(receiver):
    chan, raw = receiver
    (frame,) = sealed_frames([{"t": "add", "prompt": PROMPT}], is_client=True)
    raw.sendall(frame + frame)
    assert chan.recv()["prompt"] == PROMPT
    with pytest.raises(ProtocolError):
        chan.recv()


def test_reordered_frames_are_refused(receiver):
    chan, raw = receiver
    first, second = sealed_frames([{"t": "a"}, {"t": "b"}], is_client=True)
    raw.sendall(second + first)
    with pytest.raises(ProtocolError):
        chan.recv()


def test_a_frame_reflected_to_its_sender_is_refused(receiver):
    """The server's own frame 0, sent back to it, has the counter it expects but the
    other direction's label."""
    chan, raw = receiver
    (own,) = sealed_frames([{"t": "token", "text": PROMPT}], is_client=False)
    raw.sendall(own)
    with pytest.raises(ProtocolError):
        chan.recv()


def test_a_frame_over_the_limit_is_refused_before_its_body_is_read(receiver):
    chan, raw = receiver
    raw.sendall(struct.pack(">I", MAX_FRAME + 1))  # the header alone: no body follows
    with pytest.raises(ProtocolError, match="over the"):
        chan.recv()  # reading a body would wait for the deadline (TimeoutError)


def test_before_the_session_the_limit_is_small_and_garbage_is_refused():
    mine, raw = socket.socketpair()
    chan = Channel(mine, is_client=False)
    chan.deadline = time.monotonic() + 5
    raw.sendall(struct.pack(">I", MAX_HANDSHAKE_FRAME + 1))
    with pytest.raises(ProtocolError, match="over the"):
        chan.recv()
    for body in (b"\xd4\x05\x00", msgpack.packb([1, 2]), msgpack.packb({"t": 1})):
        raw.sendall(struct.pack(">I", len(body)) + body)
        with pytest.raises(ProtocolError):
            chan.recv()
    chan.close()
    raw.close()


def test_a_sender_refuses_a_frame_over_the_limit():
    mine, raw = socket.socketpair()
    chan = Channel(mine, is_client=True)
    chan.start_session(KEY)
    with pytest.raises(ValueError):
        chan.send({"t": "chunk", "data": b"\0" * MAX_FRAME})
    chan.send({"t": "after"})  # nothing went out, the counter did not move: frame 0 next
    body = read_frame(raw)
    assert msgpack.unpackb(ChaCha20Poly1305(KEY).decrypt(nonce(b"c->s", 0), body, None)) == {"t": "after"}
    chan.close()
    raw.close()


def test_a_closed_peer_is_a_connection_error(receiver):
    chan, raw = receiver
    (frame,) = sealed_frames([{"t": "hb"}], is_client=True)
    raw.sendall(frame[:7])  # part of a frame, then gone
    raw.close()
    with pytest.raises(ConnectionError):
        chan.recv()


def test_send_from_many_threads_keeps_frames_whole_and_in_counter_order(receiver):
    chan, raw = receiver
    raw.settimeout(5)  # if the reader stops, the senders give up instead of blocking
    sender = Channel(raw, is_client=True)
    sender.start_session(KEY)
    threads = [threading.Thread(target=lambda k=k: [sender.send({"t": "x", "k": k, "i": i,
                                                                   "pad": os.urandom(3000)})
                                                    for i in range(100)])
               for k in range(4)]
    got: list[dict] = []
    reader = threading.Thread(target=lambda: got.extend(chan.recv() for _ in range(400)))
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.join(10)
    assert len(got) == 400
    for k in range(4):  # each thread's own messages in the order it sent them
        assert [m["i"] for m in got if m["k"] == k] == list(range(100))
