"""What a node tells others about itself: chip, memory, GPU cores and measured memory
bandwidth. The one probe of this machine: the node daemon advertises it, and `mlxdist plan`
describes this machine with it when no cluster answers."""

from __future__ import annotations

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
class Hardware:
    chip: str
    memory_total: int
    memory_available: int
    gpu_cores: int
    bandwidth_gbs: float  # measured: numpy copy, read + write bytes per second


def run_quiet(cmd: list[str], timeout: float = 5.0) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def chip_name() -> str:
    if platform.system() == "Darwin":
        name = run_quiet(["sysctl", "-n", "machdep.cpu.brand_string"]).strip()
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
        out = run_quiet(["sysctl", "-n", "hw.memsize"]).strip()
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
        out = run_quiet(["vm_stat"])
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
        data = json.loads(run_quiet(["system_profiler", "SPDisplaysDataType", "-json"], 15) or "{}")
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
