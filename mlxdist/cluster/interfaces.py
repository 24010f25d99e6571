"""A node's addresses per network interface, with the Thunderbolt ones marked (the ring
prefers them: ring.py)."""

from __future__ import annotations

import ipaddress
import platform
from dataclasses import dataclass

from mlxdist.cluster.machine import run_quiet


@dataclass(frozen=True)
class Interface:
    name: str
    addresses: tuple[str, ...]
    thunderbolt: bool = False



def thunderbolt_devices() -> set[str]:
    """Interface names that are Thunderbolt (macOS: from networksetup's port list)."""
    if platform.system() != "Darwin":
        return set()
    devices, port = set(), ""
    for line in run_quiet(["networksetup", "-listallhardwareports"]).splitlines():
        if line.startswith("Hardware Port:"):
            port = line.split(":", 1)[1].strip()
        elif line.startswith("Device:") and "thunderbolt" in port.lower():
            devices.add(line.split(":", 1)[1].strip())
    return devices


def list_interfaces(only: tuple[str, ...] = (), thunderbolt: tuple[str, ...] = (),
                    addresses: tuple[str, ...] = ()) -> tuple[Interface, ...]:
    """IPv4 addresses per interface, without link-local ones, and without loopback unless
    named (`--interface lo`, `--address 127.0.0.1`: a cluster on one machine). `only`
    restricts to named interfaces; `thunderbolt` marks more interfaces as Thunderbolt
    (Linux, tests); `addresses` restricts to those addresses."""
    import ifaddr  # a dependency of zeroconf

    tb = thunderbolt_devices() | set(thunderbolt)
    found = []
    for adapter in ifaddr.get_adapters():
        name = adapter.nice_name
        if only and name not in only:
            continue
        ips = []
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue  # IPv6 entries are tuples; the ring backend speaks IPv4 here
            addr = ipaddress.ip_address(ip.ip)
            named = name in only or ip.ip in addresses
            if addr.is_link_local or (addr.is_loopback and not named):
                continue
            if addresses and ip.ip not in addresses:
                continue
            ips.append(f"{ip.ip}/{ip.network_prefix}")
        if ips:
            marked = name in tb or name.startswith("bridge") and platform.system() == "Darwin"
            found.append(Interface(name, tuple(ips), marked))
    return tuple(found)
