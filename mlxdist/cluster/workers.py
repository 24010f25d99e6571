"""Starting workers on a node at the coordinator's request, safely.

The control plane never carries a command line. A launch order names a job, a rank, the
hostfile (validated addresses) and a stage the node already holds (resolved in its own
data dir); the node builds the argument list itself and runs only
`python -m mlxdist.runtime.worker`. Options are allow-listed by name and type.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

WORKER_MODULE = "mlxdist.runtime.worker"
# The node operator (not the network) may point at another module for tests.
_MODULE_OVERRIDE_RE = re.compile(r"^(mlxdist|tests)(\.[A-Za-z_][A-Za-z0-9_]*)+$")
JOB_RE = re.compile(r"^[0-9a-f]{8,32}$")
BACKENDS = ("ring",)
MAX_RANKS = 64
# option name -> type; values become `--name value` (bool: `--name` when true)
OPTIONS: dict[str, type] = {
    "max_tokens": int, "max_batch": int, "context_length": int, "prefill_step": int,
    "seed": int, "log_level": str,
}
SAFE_STR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:,=+-]{0,127}$")


class LaunchError(Exception):
    """A launch order the node refuses."""


@dataclass(frozen=True)
class LaunchSpec:
    job: str
    rank: int
    hostfile: tuple[tuple[str, ...], ...]
    backend: str
    model: str
    stage: int
    options: tuple[tuple[str, object], ...]


def _check_endpoint(text: object) -> str:
    if not isinstance(text, str) or text.count(":") != 1:
        raise LaunchError(f"bad address {text!r} (want ip:port)")
    host, port = text.split(":")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise LaunchError(f"bad address {text!r} (want an IPv4 address)") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise LaunchError(f"bad port in {text!r}")
    return text


def parse_launch(msg: dict) -> LaunchSpec:
    job, rank, hostfile = msg.get("job"), msg.get("rank"), msg.get("hostfile")
    if not isinstance(job, str) or not JOB_RE.match(job):
        raise LaunchError("bad job id")
    if not isinstance(hostfile, list) or not 1 <= len(hostfile) <= MAX_RANKS:
        raise LaunchError("bad hostfile")
    hosts = []
    for entry in hostfile:
        if not isinstance(entry, list) or not 1 <= len(entry) <= 8:
            raise LaunchError("bad hostfile entry")
        hosts.append(tuple(_check_endpoint(e) for e in entry))
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < len(hosts):
        raise LaunchError("bad rank")
    backend = msg.get("backend", "ring")
    if backend not in BACKENDS:
        raise LaunchError(f"backend {backend!r} not supported")
    from mlxdist.cluster.shards import ShardError, check_name
    try:
        model, stage = check_name(msg.get("model"), msg.get("stage"))
    except ShardError as e:
        raise LaunchError(str(e)) from None
    options = msg.get("options", {})
    if not isinstance(options, dict):
        raise LaunchError("bad options")
    checked = []
    for name, value in sorted(options.items()):
        kind = OPTIONS.get(name)
        if kind is None:
            raise LaunchError(f"option {name!r} not allowed")
        if type(value) is not kind and not (kind is float and type(value) is int):
            raise LaunchError(f"option {name!r} must be {kind.__name__}")
        if kind is str and not SAFE_STR.match(value):
            raise LaunchError(f"option {name!r} has unsafe characters")
        checked.append((name, value))
    return LaunchSpec(job, rank, tuple(hosts), backend, model, stage, tuple(checked))


def worker_module() -> str:
    override = os.environ.get("MLXDIST_WORKER_MODULE")
    if override and _MODULE_OVERRIDE_RE.match(override):
        return override
    return WORKER_MODULE


def worker_argv(spec: LaunchSpec, stage_dir: Path, hostfile_path: Path) -> list[str]:
    argv = [sys.executable, "-m", worker_module(), "--stage-dir", str(stage_dir),
            "--rank", str(spec.rank), "--world-size", str(len(spec.hostfile)),
            "--hostfile", str(hostfile_path), "--backend", spec.backend]
    for name, value in spec.options:
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv


class Workers:
    """Worker processes this node started, by (job, rank)."""

    def __init__(self, jobs_dir: Path) -> None:
        self.jobs_dir = Path(jobs_dir)
        self._procs: dict[tuple[str, int], subprocess.Popen] = {}
        self._lock = threading.Lock()

    def start(self, spec: LaunchSpec, stage_dir: Path) -> int:
        with self._lock:
            if (spec.job, spec.rank) in self._procs:
                raise LaunchError(f"job {spec.job} rank {spec.rank} already running here")
            if len(self._procs) >= 16:
                self._reap()
                if len(self._procs) >= 16:
                    raise LaunchError("too many workers on this node")
            run_dir = self.jobs_dir / spec.job / f"rank{spec.rank}"
            run_dir.mkdir(parents=True, exist_ok=True)
            hostfile = run_dir / "hostfile.json"
            hostfile.write_text(json.dumps([list(h) for h in spec.hostfile]))
            env = dict(os.environ, MLX_RANK=str(spec.rank), MLX_HOSTFILE=str(hostfile),
                       MLX_WORLD_SIZE=str(len(spec.hostfile)))
            log = open(run_dir / "worker.log", "wb")
            try:
                proc = subprocess.Popen(worker_argv(spec, stage_dir, hostfile), env=env,
                                        cwd=run_dir, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            finally:
                log.close()
            self._procs[(spec.job, spec.rank)] = proc
            return proc.pid

    def _reap(self) -> None:
        for key in [k for k, p in self._procs.items() if p.poll() is not None]:
            del self._procs[key]

    def status(self, job: str) -> list[dict]:
        with self._lock:
            out = []
            for (j, rank), proc in sorted(self._procs.items()):
                if j != job:
                    continue
                log = self.jobs_dir / j / f"rank{rank}" / "worker.log"
                try:
                    tail = log.read_bytes()[-2000:].decode(errors="replace")
                except OSError:
                    tail = ""
                out.append({"rank": rank, "pid": proc.pid, "returncode": proc.poll(),
                            "log_tail": tail})
            return out

    def summary(self) -> list[dict]:
        with self._lock:
            return [{"job": j, "rank": r, "running": p.poll() is None}
                    for (j, r), p in sorted(self._procs.items())]

    def stop(self, job: str | None = None, grace_s: float = 3.0) -> int:
        with self._lock:
            procs = {k: p for k, p in self._procs.items() if job is None or k[0] == job}
            for key in procs:
                del self._procs[key]
        for p in procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except OSError:
                    pass
        deadline = time.monotonic() + grace_s
        for p in procs.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
                p.wait(timeout=5)
        return len(procs)
