"""Sums over a contiguous run of ranks [first, last] of a ring group, over neighbour
send/recv only: the substitute for `all_sum` in an expert-parallel stage that spans SOME
of the group's ranks (a "mixed plan", docs/placement.md).

MLX's ring and jaccl backends have no sub-groups (`Group.split` is not implemented),
`all_sum` always spans the whole group, and send/recv reach only the two ring neighbours.
Ranks first..last are neighbours in turn, so a sum over them can travel along the chain:

- `chain_sum(..., scheme="relay")` (the default): each member sends, in one message
  each way, its own part together with the parts it got from the far side: member r
  sends parts first..r to r+1 and parts r..last to r-1. After m-1 hops (m members)
  every member holds all m parts and adds them in member order. The two directions
  overlap: the sends run on a stream of their own, so a member sending to a neighbour
  that is sending to it never waits for it. Each link carries up to m-1 vectors each
  way. Up to 3 members (RELAY_MAX_MEMBERS).
- `chain_sum(..., scheme="reduce")`: the running sum flows first -> last (each adds its
  part), then the total flows back last -> first: 2(m-1) hops one after the other, on
  the caller's stream, each link carrying one vector per direction.

Both give every member the same bits (the same additions in the same order: relay adds in
member order everywhere, reduce computes the total once), which an expert-parallel stage
needs: its members route the next layer from this sum, and a differing last bit could
send a near-tie token to different experts on different members.

    from mlxdist.runtime.chain import chain_expert_parallel
    chain_expert_parallel(model, owned, group, first=1, last=2, layers=range(k, L))
"""

from __future__ import annotations

from functools import partial, reduce
from typing import Iterable

import mlx.core as mx
import mlx.nn as nn

from mlxdist.runtime.expert_parallel import expert_parallel

SCHEMES = ("relay", "reduce")
# With 4 members the relay hung on MLX 0.32's ring backend (both middle members wait in a
# receive while their forwards, on the send stream, never leave; not diagnosed further):
# it is used only where it was tested, 2 and 3 members.
RELAY_MAX_MEMBERS = 3

_send_streams: dict[str, mx.Stream] = {}


def _send_stream(device: mx.Device) -> mx.Stream:
    """The relay's stream for sends (one per device, made once: a stream is a thread).
    Receives stay on the caller's stream with every other receive, because a receive has
    no inputs, so only a stream's order keeps two receives from one neighbour in order;
    sends have inputs, and data dependencies order them across streams."""
    key = str(device)
    if key not in _send_streams:
        _send_streams[key] = mx.new_stream(device)
    return _send_streams[key]


def _in_order(*arrays: mx.array) -> list[mx.array]:
    """The same arrays, scheduled in this order: MLX orders a graph depth first over each
    node's inputs in turn, and a receive has no inputs to be ordered by."""
    return mx.depends(list(arrays), [arrays[0]])


def _check(group: mx.distributed.Group, first: int, last: int) -> int:
    rank = group.rank()
    if not 0 <= first <= last < group.size():
        raise ValueError(f"members {first}..{last} are not ranks of a group of {group.size()}")
    if not first <= rank <= last:
        raise ValueError(f"rank {rank} is not one of the members {first}..{last}")
    return rank


def chain_sum(x: mx.array, group: mx.distributed.Group, first: int, last: int,
              scheme: str = "relay") -> mx.array:
    """The sum of `x` over ranks first..last of `group` (lazy), the same bits on each of
    them. Call it on the members only, each with an `x` of the same shape and dtype; the
    other ranks take no part. Successive calls keep their order on the links when each
    call's `x` depends on the previous call's result (as a model's layers do)."""
    rank = _check(group, first, last)
    if first == last:
        return x
    if scheme == "relay":
        if last - first + 1 > RELAY_MAX_MEMBERS:
            raise ValueError(f"the relay scheme is for up to {RELAY_MAX_MEMBERS} members; "
                             f"use scheme='reduce' for {last - first + 1}")
        return _relay_sum(x, group, rank, first, last)
    if scheme == "reduce":
        return _reduce_sum(x, group, rank, first, last)
    raise ValueError(f"scheme must be one of {SCHEMES}; got {scheme!r}")


def _reduce_sum(x: mx.array, group: mx.distributed.Group, rank: int, first: int, last: int) -> mx.array:
    """Partial sums first -> last, the total back last -> first, all on one stream, each
    receive scheduled after what this rank sends before it."""
    acc = x
    if rank > first:
        x, left = _in_order(x, mx.distributed.recv_like(x, rank - 1, group=group))
        acc = left + x
    if rank == last:
        total = acc
    else:
        sent = mx.distributed.send(acc, rank + 1, group=group)
        sent, total = _in_order(sent, mx.distributed.recv_like(x, rank + 1, group=group))
    if rank > first:
        total = mx.depends(total, mx.distributed.send(total, rank - 1, group=group))
    return total


def _relay_sum(x: mx.array, group: mx.distributed.Group, rank: int, first: int, last: int) -> mx.array:
    """One message each way per link, parts stacked: from the left parts first..rank-1,
    from the right parts rank+1..last; the sum adds all parts in member order. What is
    sent is built on the send stream too: the caller's stream may be waiting in a receive
    that only comes after the neighbour got this send."""
    ss = _send_stream(mx.default_device())
    own = x[None]
    recvs = []
    if rank > first:
        recvs.append(mx.distributed.recv((rank - first, *x.shape), x.dtype, rank - 1, group=group))
    if rank < last:
        recvs.append(mx.distributed.recv((last - rank, *x.shape), x.dtype, rank + 1, group=group))
    # the receives after everything x came from (their outputs wait for both: the sends
    # take `own` itself)
    _, *recvs = _in_order(own, *recvs)
    from_left = recvs.pop(0) if rank > first else None
    from_right = recvs.pop(0) if rank < last else None
    sends = []
    if rank < last:
        msg = own if from_left is None else mx.concatenate([from_left, own], stream=ss)
        sends.append(mx.distributed.send(msg, rank + 1, group=group, stream=ss))
    if rank > first:
        msg = own if from_right is None else mx.concatenate([own, from_right], stream=ss)
        sends.append(mx.distributed.send(msg, rank - 1, group=group, stream=ss))
    parts = [p for p in (from_left, own, from_right) if p is not None]
    parts = mx.concatenate(parts) if len(parts) > 1 else parts[0]
    total = reduce(mx.add, (parts[i] for i in range(last - first + 1)))
    return mx.depends(total, sends)


def chain_expert_parallel(model: nn.Module, owned: Iterable[int], group: mx.distributed.Group,
                          first: int, last: int, layers: range | None = None,
                          scheme: str = "relay") -> int:
    """`expert_parallel` for a stage whose members are ranks first..last of `group`: each
    MoE block in `layers` keeps experts `owned` and combines with `chain_sum` over the
    members instead of `all_sum` over the group; the shared experts are added on `first`.
    Returns how many blocks were replaced."""
    _check(group, first, last)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}; got {scheme!r}")
    combine = partial(chain_sum, group=group, first=first, last=last, scheme=scheme)
    return expert_parallel(model, owned, group, shared_rank=first, layers=layers, combine=combine)
