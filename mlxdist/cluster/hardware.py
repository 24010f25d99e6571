"""What a node tells others about itself: chip, memory, GPU cores, memory bandwidth, and
its addresses per interface with the Thunderbolt ones marked."""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Interface:
    name: str
    addresses: tuple[str, ...]
    thunderbolt: bool = False


@dataclass(frozen=True)
class Hardware:
    chip: str
    memory_total: int
    memory_available: int
    gpu_cores: int
    bandwidth_gbs: float  # measured: numpy copy, read + write bytes per second


def _run(cmd: list[str], timeout: float = 5.0) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def chip_name() -> str:
    if platform.system() == "Darwin":
        name = _run(["sysctl", "-n", "machdep.cpu.brand_string"]).strip()
        if name:
            return name
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_total() -> int:
    if platform.system() == "Darwin":
        out = _run(["sysctl", "-n", "hw.memsize"]).strip()
        if out.isdigit():
            return int(out)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if platform.system() == "Darwin":  # free + inactive + speculative pages
        out = _run(["vm_stat"])
        page = re.search(r"page size of (\d+)", out)
        pages = sum(int(m) for m in re.findall(
            r"Pages (?:free|inactive|speculative):\s+(\d+)", out))
        if page:
            return pages * int(page.group(1))
    return memory_total()


def gpu_cores() -> int:
    if platform.system() != "Darwin":
        return 0
    try:
        data = json.loads(_run(["system_profiler", "SPDisplaysDataType", "-json"], 15) or "{}")
        for gpu in data.get("SPDisplaysDataType", []):
            if str(gpu.get("sppci_cores", "")).isdigit():
                return int(gpu["sppci_cores"])
    except ValueError:
        pass
    return 0


def measure_bandwidth(mib: int = 64, repeats: int = 3) -> float:
    """GB/s of a large numpy copy (counts read + write), best of a few: a quick proxy for
    the memory bandwidth that bounds decode speed."""
    src = np.ones(mib << 18, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return round(2 * src.nbytes / best / 1e9, 2)


def probe_hardware(cache_dir: Path | None = None) -> Hardware:
    """Measure once; the bandwidth figure is cached per chip and memory size."""
    chip, total = chip_name(), memory_total()
    cache = cache_dir / "hardware.json" if cache_dir else None
    bandwidth = None
    if cache and cache.exists():
        try:
            data = json.loads(cache.read_text())
            if data.get("chip") == chip and data.get("memory_total") == total:
                bandwidth = float(data["bandwidth_gbs"])
        except (ValueError, KeyError):
            pass
    if bandwidth is None:
        bandwidth = measure_bandwidth()
    hw = Hardware(chip, total, memory_available(), gpu_cores(), bandwidth)
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(hw)))
        tmp.replace(cache)
    return hw


def thunderbolt_devices() -> set[str]:
    """Interface names that are Thunderbolt (macOS: from networksetup's port list)."""
    if platform.system() != "Darwin":
        return set()
    devices, port = set(), ""
    for line in _run(["networksetup", "-listallhardwareports"]).splitlines():
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
