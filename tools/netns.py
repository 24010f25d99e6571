#!/usr/bin/env python3
"""A test network: N hosts as Linux network namespaces, each with one veth ("eth0") on a
bridge that lives in its own "switch" namespace. Nothing is created in the machine's own
namespace: its interfaces, routes and addresses are never touched, and every address is
in a private subnet that exists only inside these namespaces.

    with TestNet(3) as net:
        net.run(0, ["ip", "addr"])
        p = net.popen(1, [sys.executable, "-m", "mlxdist", "node", ...])
        net.link_down(2); net.rate_limit(1, "20mbit")

Teardown (kill what runs inside, delete the namespaces) always happens: on exit of the
`with`, at interpreter exit, and by `python tools/netns.py cleanup` for leftovers.
Needs root and iproute2 (`ip`, `tc`).
"""

from __future__ import annotations

import atexit
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence

PREFIX = "mdxt"  # every namespace made here starts with this


@dataclass(frozen=True)
class Host:
    index: int
    ns: str
    ip: str
    port_name: str  # the veth end on the switch side


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20,
                          check=check)


class TestNet:
    __test__ = False  # not a pytest class

    def __init__(self, n: int, subnet_octet: int | None = None) -> None:
        self.n = n
        self.tag = f"{PREFIX}{secrets.token_hex(3)}"
        self.switch = f"{self.tag}-sw"
        octet = subnet_octet if subnet_octet is not None else random.randrange(1, 250)
        self.subnet = f"10.213.{octet}"
        self.hosts = [Host(i, f"{self.tag}-h{i}", f"{self.subnet}.{i + 10}", f"p{self.tag[-6:]}{i}")
                       for i in range(n)]
        self._up = False

    # -- lifecycle ------------------------------------------------------------------
    def __enter__(self) -> "TestNet":
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        atexit.register(self.down)
        self._up = True
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for h in self.hosts:
                _ip("netns", "add", h.ns)
                _ip("-n", h.ns, "link", "set", "lo", "up")
                _ip("-n", self.switch, "link", "add", h.port_name, "type", "veth", "peer",
                    "name", "eth0", "netns", h.ns)
                _ip("-n", self.switch, "link", "set", h.port_name, "master", "br0")
                _ip("-n", self.switch, "link", "set", h.port_name, "up")
                _ip("-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
                _ip("-n", h.ns, "link", "set", "eth0", "up")
                _ip("-n", h.ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        except Exception:
            self.down()
            raise

    def down(self) -> None:
        if not self._up:
            return
        self._up = False
        for ns in [h.ns for h in self.hosts] + [self.switch]:
            kill_namespace(ns)
        try:
            atexit.unregister(self.down)
        except Exception:
            pass

    # -- running things inside ------------------------------------------------------
    def argv(self, i: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[i].ns, *argv]

    def popen(self, i: int, argv: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(i, argv), **kw)

    def run(self, i: int, argv: Sequence[str], timeout: float = 60, **kw
            ) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(i, argv), timeout=timeout, **kw)

    # -- faults and link shaping ------------------------------------------------------
    def link_down(self, i: int) -> None:
        _ip("-n", self.switch, "link", "set", self.hosts[i].port_name, "down")

    def link_up(self, i: int) -> None:
        _ip("-n", self.switch, "link", "set", self.hosts[i].port_name, "up")

    def rate_limit(self, i: int, rate: str = "20mbit", burst: str = "64kb",
                   latency: str = "100ms") -> None:
        """tc tbf both ways on host i's link (its eth0 and the switch's port to it)."""
        for ns, dev in ((self.hosts[i].ns, "eth0"), (self.switch, self.hosts[i].port_name)):
            subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                            "rate", rate, "burst", burst, "latency", latency],
                           check=True, capture_output=True, timeout=20)

    def clear_rate_limit(self, i: int) -> None:
        for ns, dev in ((self.hosts[i].ns, "eth0"), (self.switch, self.hosts[i].port_name)):
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"],
                           capture_output=True, timeout=20)


def kill_namespace(ns: str) -> None:
    """Kill the processes inside `ns` (started by us, in it) and delete it."""
    kill_processes(ns)
    _ip("netns", "del", ns, check=False)


def kill_processes(ns: str) -> None:
    """Kill every process inside `ns` (all started by us, in it): a host dying."""
    out = _ip("netns", "pids", ns, check=False).stdout.split()
    pids = [int(p) for p in out if p.isdigit()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:  # a zombie (killed, not yet reaped by its parent) counts as dead
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cleanup_leftovers() -> list[str]:
    """Delete namespaces a crashed run of this harness left behind."""
    names = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines()
             if line.startswith(PREFIX)]
    for ns in names:
        kill_namespace(ns)
    return names


def main() -> None:
    if len(sys.argv) == 2 and sys.argv[1] == "cleanup":
        print("removed:", " ".join(cleanup_leftovers()) or "nothing")
        return
    if len(sys.argv) == 3 and sys.argv[1] == "demo":
        with TestNet(int(sys.argv[2])) as net:
            for h in net.hosts:
                print(h.ns, h.ip)
            print(net.run(0, ["ping", "-c", "1", "-W", "2", net.hosts[-1].ip]).stdout)
        return
    sys.exit("usage: tools/netns.py cleanup | demo N")


if __name__ == "__main__":
    main()
