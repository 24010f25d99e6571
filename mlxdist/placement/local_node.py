"""This machine as a NodeSpec, for `--nodes auto` when no cluster is there to ask.

Reads numbers only (/proc/meminfo, sysctl on macOS); knows nothing of placement.
"""

from __future__ import annotations

import platform
import socket
import subprocess

from mlxdist.placement.hardware import CHIPS, GB, NodeSpec, default_reserve


def total_memory_bytes() -> int:
    if platform.system() == "Darwin":
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().isdigit():
            return int(out.stdout.strip())
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GB


def chip_name() -> str:
    if platform.system() == "Darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        brand = out.stdout.strip().removeprefix("Apple ").strip()
        if brand in CHIPS:
            return brand
    return "generic"


def local_node(reserve_gb: float | None = None) -> NodeSpec:
    mem = total_memory_bytes()
    chip = CHIPS[chip_name()]
    reserve = default_reserve(mem) if reserve_gb is None else int(reserve_gb * GB)
    return NodeSpec(socket.gethostname() or "localhost", mem, chip.bandwidth_gbs * GB,
                    chip.fp16_tflops * 1e12, reserve, chip.name)
