"""Ring order and addresses for the MLX ring backend: pure functions of the nodes'
interfaces. A link between two nodes is an IPv4 subnet both have an address in;
Thunderbolt links beat other links, and other links beat nothing."""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass
from typing import Sequence

from mlxdist.cluster.interfaces import Interface

THUNDERBOLT, LAN, NONE = 2, 1, 0


@dataclass(frozen=True)
class RingMember:
    node_id: str
    interfaces: tuple[Interface, ...]
    fallback: str = ""  # the address we reach its control plane on


def _nets(m: RingMember) -> list[tuple[ipaddress.IPv4Interface, bool]]:
    out = []
    for iface in m.interfaces:
        for a in iface.addresses:
            try:
                out.append((ipaddress.IPv4Interface(a if "/" in a else a + "/32"),
                            iface.thunderbolt))
            except ValueError:
                continue
    return out


def link(a: RingMember, b: RingMember) -> tuple[int, str, str]:
    """(quality, address of a, address of b) of the best link between a and b."""
    best = (NONE, a.fallback, b.fallback)
    for na, tba in _nets(a):
        for nb, tbb in _nets(b):
            if na.network == nb.network and na.ip != nb.ip:
                q = THUNDERBOLT if tba and tbb else LAN
                if q > best[0]:
                    best = (q, str(na.ip), str(nb.ip))
    return best


def choose_ring(members: Sequence[RingMember]) -> list[int]:
    """An order of the members (the first stays first: it is the coordinator) that
    maximises the links around the ring: exhaustive up to 8 nodes, greedy beyond."""
    n = len(members)
    if n <= 2:
        return list(range(n))
    score = [[link(members[i], members[j])[0] for j in range(n)] for i in range(n)]

    def total(order: Sequence[int]) -> int:
        return sum(score[order[k]][order[(k + 1) % n]] for k in range(n))

    if n <= 8:
        return max(([0, *p] for p in itertools.permutations(range(1, n))), key=total)
    order, left = [0], set(range(1, n))
    while left:
        nxt = max(sorted(left), key=lambda j: score[order[-1]][j])
        order.append(nxt)
        left.remove(nxt)
    return order


def ring_addresses(members: Sequence[RingMember]) -> list[str]:
    """The address each rank listens on: one its neighbours share a subnet with,
    Thunderbolt first (rank r talks to r-1 and r+1)."""
    n = len(members)
    out = []
    for r, m in enumerate(members):
        if n == 1:
            out.append(m.fallback or "127.0.0.1")
            continue
        candidates: dict[str, int] = {}
        for other in {(r - 1) % n, (r + 1) % n}:
            q, mine, _ = link(m, members[other])
            candidates[mine] = candidates.get(mine, 0) + q
        out.append(max(candidates, key=lambda a: (candidates[a], a == m.fallback)) or m.fallback)
    return out


def hostfile_for(members: Sequence[RingMember], ports: int | Sequence[int]) -> list[list[str]]:
    """The MLX ring hostfile (one list of "ip:port" per rank), in the given order. `ports`
    is one port per rank (as the nodes reported free), or a base port: base + rank."""
    addresses = ring_addresses(members)
    if isinstance(ports, int):
        ports = [ports + r for r in range(len(members))]
    return [[f"{ip}:{port}"] for ip, port in zip(addresses, ports)]
