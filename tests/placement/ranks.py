"""Start N local ranks of a script on the ring backend over 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_ranks(n: int, argv: list[str], timeout: float = 120) -> list[tuple[int, str]]:
    """Run `python argv...` as ranks 0..n-1; returns (returncode, stderr) per rank. Every
    rank is killed if any is still running at the timeout."""
    with tempfile.TemporaryDirectory() as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
        env = dict(os.environ, PYTHONPATH=str(ROOT), MLX_HOSTFILE=str(hostfile))
        if n == 1:  # a ring of one cannot connect to itself
            env.pop("MLX_HOSTFILE")
        procs, logs = [], []
        for r in range(n):
            logs.append(open(Path(tmp) / f"rank{r}.err", "w+"))
            procs.append(subprocess.Popen([sys.executable, *argv], env=dict(env, MLX_RANK=str(r)),
                                          stdout=subprocess.DEVNULL, stderr=logs[-1]))
        deadline = time.monotonic() + timeout
        try:
            # a rank that fails leaves the others waiting on the ring: stop them all
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                if any(p.poll() not in (None, 0) for p in procs):
                    break
                time.sleep(0.1)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            out = []
            for p, log in zip(procs, logs):
                p.wait()
                log.seek(0)
                out.append((p.returncode, log.read()[-3000:]))
                log.close()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return out
