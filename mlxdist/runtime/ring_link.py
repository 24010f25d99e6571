"""The messages that travel the ring of stages, over `mx.distributed` send/recv only.

Every message is a fixed int32 header of HEADER_WORDS words, optionally followed by one
payload array whose shape and dtype the header gives:

    [op, slot, n, flags, dtype, token, logprob_bits, tag]

(words 5 and 6 are the kept prefix and its source slot in a SETUP with FLAG_REUSE). Ops
RUN and TRIM start and close a lock-step decode run (lockstep.py).

Continuous batching (batch.py): JOIN [op, group, n, 0, 0, slot] moves a slot's caches
into a group as its last row, with n prompt tokens still to run (0: prefilled); LEAVE
[op, group, 0, flags, 0, slot] takes the row out (FLAG_RETAIN: its caches stay in the
slot); MERGE [op, group, 0, 0, 0, other] appends group `other`'s rows to `group`; MOVE
[op, group, 0, 0, 0, slot, to] moves one row to the end of group `to` (rebalancing). None
is answered: the last stage just applies them. A FORWARD with FLAG_GROUP carries the hidden
states [B, n, D] of a group's B rows: n = 1, a decode step, which the last stage answers
with one TOKEN with FLAG_GROUP whose `n` words of payload are the B tokens, their B
logprobs (bit-cast) and the top logprobs of the rows that asked for them, in row order,
sent as ONE int32 message with its header (rank 0 knows the size from its rows, so it can
post the receive before the reply is there: chained steps); or
n > 1 without FLAG_SAMPLE, the rows' pending prompt tokens right-padded to n (answered
with an ACK).

rank r sends only to r+1 and receives only from r-1 (mod N), which is all the ring and
jaccl backends allow; the last stage's reply to rank 0 is the ring's wrap-around link.
"""

from __future__ import annotations

import os
import select
import socket

import mlx.core as mx
import numpy as np

HEADER_WORDS = 8
OP_SETUP, OP_FORWARD, OP_FREE, OP_STOP, OP_TOKEN, OP_ACK, OP_PARK, OP_RUN, OP_TRIM = 1, 2, 3, 4, 5, 6, 7, 8, 9
OP_JOIN, OP_LEAVE, OP_MERGE, OP_MOVE = 10, 11, 12, 13
GROUP_OPS = (OP_JOIN, OP_LEAVE, OP_MERGE, OP_MOVE)  # change a group's rows; never answered
OP_NAMES = {1: "setup", 2: "forward", 3: "free", 4: "stop", 5: "token", 6: "ack", 7: "park", 8: "run",
            9: "trim", 10: "join", 11: "leave", 12: "merge", 13: "move"}
FLAG_SAMPLE = 1  # run the head and sample after this chunk
FLAG_REUSE = 2  # SETUP: start from a copy of slot `aux`'s caches (word 6) cut to `value` (word 5)
FLAG_GROUP = 4  # FORWARD / TOKEN: word 1 is a group (a batch of rows), not a slot
FLAG_RETAIN = 8  # LEAVE: keep the row's caches in its slot (prefix caching)

DTYPES = [mx.float32, mx.float16, mx.bfloat16, mx.int32]


def dtype_code(dtype: mx.Dtype) -> int:
    return DTYPES.index(dtype)


def header(op: int, slot: int, n: int = 0, flags: int = 0, dtype: int = 0, tag: int = 0,
           value: int = 0, aux: int = 0) -> mx.array:
    """Words 5 and 6 (`value`, `aux`) carry a token and its logprob in TOKEN replies, the
    kept prefix length and its source slot in a SETUP with FLAG_REUSE."""
    return mx.array([op, slot, n, flags, dtype, value, aux, tag], dtype=mx.int32)


def token_header(slot: int, token: mx.array, logprob: mx.array, tag: int, n_top: int = 0) -> mx.array:
    """The last stage's reply, built on the device so that sending it needs no host sync.
    `n` (word 2) is the number of top-logprob pairs in the int32 [2n] payload that follows."""
    head = mx.array([OP_TOKEN, slot, n_top, 0, 0], dtype=mx.int32)
    return mx.concatenate([head, token.astype(mx.int32), logprob.astype(mx.float32).view(mx.int32),
                           mx.array([tag], dtype=mx.int32)])


def read_token(h: np.ndarray) -> tuple[int, float]:
    return int(h[5]), float(np.array([h[6]], np.int32).view(np.float32)[0])


def inbound_ring_sockets(my_ports: set[int]) -> list[socket.socket]:
    """The ring backend's sockets that carry data from the previous rank: the connections
    it accepted on this rank's own hostfile ports. (Duplicates; used only to wait.)"""
    found = []
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"  # Linux, macOS
    for name in os.listdir(fd_dir):
        try:
            s = socket.fromfd(int(name), socket.AF_INET, socket.SOCK_STREAM)
        except (OSError, ValueError):
            continue
        try:
            if s.getsockname()[1] in my_ports and s.getpeername():
                found.append(s)
                continue
        except (OSError, IndexError, TypeError):  # not a connected TCP socket
            pass
        s.close()
    return found


class RingLink:
    """send to the next rank, receive from the previous one.

    The ring backend serves a pending recv by polling its socket in a loop, a whole core
    per waiting rank. Given the inbound sockets (`wait_on`), the link first waits for data
    with select(), which sleeps, and only then posts the recv.

    `collective`, when given, is the group lock-step decode runs sum over (lockstep.py): the
    ring group itself, or an NCCL group of the same ranks on CUDA GPUs."""

    def __init__(self, group: mx.distributed.Group, wait_on: list[socket.socket] | None = None,
                 collective: mx.distributed.Group | None = None):
        self.group = group
        self.collective = collective
        self.rank, self.size = group.rank(), group.size()
        self.next, self.prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.bytes_sent = 0
        self.wait_on = wait_on or []

    def send(self, head: mx.array, payload: mx.array | None = None) -> list[mx.array]:
        """Lazy sends; the caller evaluates them (asynchronously) with whatever else."""
        out = [mx.distributed.send(head, self.next, group=self.group)]
        self.bytes_sent += HEADER_WORDS * 4
        if payload is not None:
            # the payload must leave after its header: independent sends may run in any order
            payload = mx.depends(payload, out[0])
            out.append(mx.distributed.send(payload, self.next, group=self.group))
            self.bytes_sent += payload.nbytes
        return out

    def recv_header(self) -> np.ndarray:
        if self.wait_on:
            select.select(self.wait_on, [], [])
        h = mx.distributed.recv((HEADER_WORDS,), mx.int32, self.prev, group=self.group)
        mx.eval(h)  # the header says what comes next: this wait is the data's own
        return np.array(h)

    def recv_words(self, n: int) -> np.ndarray:
        """A whole message of `n` int32 words (header and payload in one), waited for."""
        if self.wait_on:
            select.select(self.wait_on, [], [])
        w = mx.distributed.recv((n,), mx.int32, self.prev, group=self.group)
        mx.eval(w)
        return np.array(w)

    def recv_payload(self, shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
        return mx.distributed.recv(shape, dtype, self.prev, group=self.group)
