"""Starting workers on a node at the coordinator's request, safely.

The control plane never carries a command line. A launch order names a job, a rank, the
hostfile (validated addresses), a stage the node already holds (resolved in its own data
dir), optionally a layer range inside it, the engine's control address and session, and
two integers; the node checks each field and builds the argument list itself with the
runtime's `WorkerSpec`, and runs only `python -m mlxdist.runtime.worker`.
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
JOB_RE = re.compile(r"^[0-9a-f]{8,32}$")
SESSION_RE = re.compile(r"^[0-9a-f]{8,64}$")
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BACKENDS = ("ring",)
HANDOFFS = ("messages", "collective")  # nccl needs one host's GPUs: local ranks only
MAX_RANKS = 64


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
    layers: tuple[int, int] | None  # None: the stage's own range (from its stage.json)
    control: str  # ip:port of the engine's control server
    session: str
    max_slots: int = 8
    prefill_step: int = 2048
    host: str = "node"  # how the engine names this rank in messages
    handoff: str = "messages"  # decode hand-offs (runtime/worker.py --handoff)
    prompt_cache: int = 0  # retained sequences (runtime/worker.py --prompt-cache)


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


def _int(msg: dict, key: str, lo: int, hi: int, default: int | None = None) -> int:
    value = msg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise LaunchError(f"bad {key}")
    return value


def parse_launch(msg: dict) -> LaunchSpec:
    job, hostfile = msg.get("job"), msg.get("hostfile")
    if not isinstance(job, str) or not JOB_RE.match(job):
        raise LaunchError("bad job id")
    if not isinstance(hostfile, list) or not 1 <= len(hostfile) <= MAX_RANKS:
        raise LaunchError("bad hostfile")
    hosts = []
    for entry in hostfile:
        if not isinstance(entry, list) or not 1 <= len(entry) <= 8:
            raise LaunchError("bad hostfile entry")
        hosts.append(tuple(_check_endpoint(e) for e in entry))
    rank = _int(msg, "rank", 0, len(hosts) - 1)
    backend = msg.get("backend", "ring")
    if backend not in BACKENDS:
        raise LaunchError(f"backend {backend!r} not supported")
    handoff = msg.get("handoff", "messages")
    if handoff not in HANDOFFS:
        raise LaunchError(f"handoff {handoff!r} not supported")
    from mlxdist.cluster.shards import ShardError, check_name
    try:
        model, stage = check_name(msg.get("model"), msg.get("stage"))
    except ShardError as e:
        raise LaunchError(str(e)) from None
    layers = msg.get("layers")
    if layers is not None:
        if not isinstance(layers, list) or len(layers) != 2 or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in layers) \
                or not 0 <= layers[0] < layers[1] <= 100000:
            raise LaunchError("bad layers")
        layers = (layers[0], layers[1])
    session, host = msg.get("session"), msg.get("host", "node")
    if not isinstance(session, str) or not SESSION_RE.match(session):
        raise LaunchError("bad session")
    if not isinstance(host, str) or not HOST_RE.match(host):
        raise LaunchError("bad host name")
    return LaunchSpec(job, rank, tuple(hosts), backend, model, stage, layers,
                      _check_endpoint(msg.get("control")), session,
                      _int(msg, "max_slots", 1, 1024, 8), _int(msg, "prefill_step", 1, 1 << 20, 2048),
                      host, handoff, _int(msg, "prompt_cache", 0, 1024, 0))


def stage_layers(stage_dir: Path) -> tuple[int, int, int]:
    """(start, end, num_layers) of a held stage, from its stage.json and config.json."""
    try:
        stage = json.loads((stage_dir / "stage.json").read_text())
        config = json.loads((stage_dir / "config.json").read_text())
        start, end = (int(x) for x in stage["layers"])
        return start, end, int(config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LaunchError(f"stage {stage_dir.name} has no readable layer range: {e}") from None


def worker_argv(spec: LaunchSpec, stage_dir: Path, hostfile_path: Path) -> list[str]:
    """The command line, built here from the runtime's own WorkerSpec. A rank may run the
    whole layer range of a stage it holds, or a part of it (re-placement); only for the
    whole stage is the shard checked against its manifest (--shard-root)."""
    from mlxdist.runtime.launcher import WorkerSpec

    have_start, have_end, num_layers = stage_layers(stage_dir)
    start, end = spec.layers or (have_start, have_end)
    if not have_start <= start < end <= have_end:
        raise LaunchError(f"layers [{start}, {end}) are not in the held stage "
                          f"[{have_start}, {have_end})")
    whole = (start, end) == (have_start, have_end)
    shard_root = str(stage_dir) if whole and (stage_dir / "manifest.json").exists() else ""
    ws = WorkerSpec(rank=spec.rank, ranks=len(spec.hostfile), hostfile=str(hostfile_path),
                    model_dir=str(stage_dir), start=start, end=end, num_layers=num_layers,
                    control=spec.control, session=spec.session, backend=spec.backend,
                    shard_root=shard_root, max_slots=spec.max_slots,
                    prefill_step=spec.prefill_step, host=spec.host, handoff=spec.handoff,
                    prompt_cache=spec.prompt_cache)
    argv = ws.argv()
    if argv[:2] != ["-m", WORKER_MODULE]:  # never anything but the runtime's worker
        raise LaunchError("the runtime's worker command changed shape")
    return [sys.executable, *argv]


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
            # the worker imports the same mlxdist as this node, installed or not
            root = str(Path(__file__).resolve().parents[2])
            env = dict(os.environ, MLX_RANK=str(spec.rank), MLX_HOSTFILE=str(hostfile),
                       PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
            argv = worker_argv(spec, stage_dir, hostfile)  # refuses before anything runs
            log = open(run_dir / "worker.log", "wb")
            try:
                proc = subprocess.Popen(argv, env=env,
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
        """SIGTERM, then SIGKILL after `grace_s`; the number stopped. The stopped ranks
        stay listed with their exit codes, so `job_status` tells the coordinator how they
        ended (killed by a signal) while this node still answers."""
        with self._lock:
            procs = {k: p for k, p in self._procs.items()
                     if (job is None or k[0] == job) and p.poll() is None}
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
