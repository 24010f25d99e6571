"""Starting workers on a node at the coordinator's request, safely.

The control plane never carries a command line. A launch order names a job, a stage the
node already holds (resolved in its own data dir) and the hostfile (validated addresses),
and carries the rank's `WorkerSpec` as the msgpack blob the worker will read: the node
parses it with `WorkerSpec.from_msgpack` (types and bounds), checks what it must (layers
inside the held stage, addresses, session, names, the options a node runs; expert
parallel only from held parts of one stage whose experts, concatenated, are the spec's;
a member of a mixed plan's expert-parallel stage from such parts, or from the whole held
stage, which it slices on load),
fills in what only it knows (its stage directories, hostfile path, shard root), and runs
only `python -m mlxdist.runtime.worker`, the spec on its stdin.
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
from dataclasses import dataclass, replace
from pathlib import Path

from mlxdist.errors import UserError
from mlxdist.runtime.launcher import WorkerSpec, start_worker
from mlxdist.shard_format import StageJson

JOB_RE = re.compile(r"^[0-9a-f]{8,32}$")
SESSION_RE = re.compile(r"^(?:[0-9a-f]{2}){4,32}$")  # a key as hex: whole bytes (the worker reads it with bytes.fromhex)
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BACKENDS = ("ring",)
HANDOFFS = ("messages", "collective")  # nccl needs one host's GPUs: local ranks only
MAX_RANKS = 64
MAX_SPEC_BYTES = 64 << 10


class LaunchError(Exception):
    """A launch order the node refuses."""


@dataclass(frozen=True)
class LaunchSpec:
    job: str
    model: str
    stage: int
    hostfile: tuple[tuple[str, ...], ...]
    worker: WorkerSpec  # as the coordinator sent it; worker_spec() makes it this node's


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
    job, hostfile, blob = msg.get("job"), msg.get("hostfile"), msg.get("spec")
    if not isinstance(job, str) or not JOB_RE.match(job):
        raise LaunchError("bad job id")
    if not isinstance(hostfile, list) or not 1 <= len(hostfile) <= MAX_RANKS:
        raise LaunchError("bad hostfile")
    hosts = []
    for entry in hostfile:
        if not isinstance(entry, list) or not 1 <= len(entry) <= 8:
            raise LaunchError("bad hostfile entry")
        hosts.append(tuple(_check_endpoint(e) for e in entry))
    from mlxdist.cluster.shards import ShardError, check_name
    try:
        model, stage = check_name(msg.get("model"), msg.get("stage"))
    except ShardError as e:
        raise LaunchError(str(e)) from None
    if not isinstance(blob, bytes) or len(blob) > MAX_SPEC_BYTES:
        raise LaunchError("bad spec (want a WorkerSpec blob)")
    try:
        worker = WorkerSpec.from_msgpack(blob)
    except ValueError as e:
        raise LaunchError(f"bad spec: {e}") from None
    _check_worker(worker, len(hosts))
    return LaunchSpec(job, model, stage, tuple(hosts), worker)


def _check_worker(w: WorkerSpec, ranks: int) -> None:
    """What a node runs: a pipeline or expert-parallel rank of this hostfile, on the ring
    (no NCCL), reporting to an IPv4 control address, with a hex session key and a plain
    host name. Whether an expert-parallel rank's experts are held here is checked against
    the held part (`worker_spec`)."""
    if w.ranks != ranks:
        raise LaunchError(f"bad spec: {w.ranks} ranks but the hostfile has {ranks}")
    if w.config.backend not in BACKENDS:
        raise LaunchError(f"backend {w.config.backend!r} not supported")
    if w.config.handoff not in HANDOFFS:
        raise LaunchError(f"handoff {w.config.handoff!r} not supported")
    if w.nccl:
        raise LaunchError("a node runs no NCCL ranks (one host's GPUs: local ranks only)")
    member = _member(w)
    if w.experts and not (w.config.expert_parallel or member):
        raise LaunchError("bad spec: experts given for a rank that is not expert-parallel")
    if w.parts and not (w.config.expert_parallel or member):
        raise LaunchError("bad spec: parts given for a rank that is not expert-parallel")
    if member and not w.experts:
        raise LaunchError(f"bad spec: rank {w.rank} is a member of the mixed plan's expert-parallel stage "
                          "but is given no experts")
    _check_endpoint(w.control)
    if not SESSION_RE.match(w.session):
        raise LaunchError("bad session")
    if not HOST_RE.match(w.host):
        raise LaunchError("bad host name")


def _member(w: WorkerSpec) -> bool:
    """Whether the rank is a member of a mixed plan's expert-parallel stage (its config's
    `stages`, runtime/mixed.py)."""
    if not w.config.stages:
        return False
    from mlxdist.runtime.mixed import members

    try:
        return w.rank in members(w.config.stages)
    except ValueError:
        raise LaunchError("bad spec: a mixed plan's stages without an expert-parallel stage") from None


def stage_layers(stage_dir: Path) -> tuple[int, int, int]:
    """(start, end, num_layers) of a held stage, from its stage.json and config.json."""
    try:
        stage = json.loads((stage_dir / "stage.json").read_text())
        config = json.loads((stage_dir / "config.json").read_text())
        start, end = (int(x) for x in stage["layers"])
        return start, end, int(config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LaunchError(f"stage {stage_dir.name} has no readable layer range: {e}") from None


def held_experts(stage_dir: Path) -> tuple[int, ...] | None:
    """The expert ids (row order) of a held part of an expert-parallel stage, None for a
    pipeline stage: its stage.json's `experts` (docs/shard-format.md)."""
    try:
        return StageJson.load(stage_dir).experts
    except UserError as e:
        raise LaunchError(f"stage {stage_dir.name}: {e}") from None


def held_parts(stage_dir: Path, names: tuple[str, ...]) -> tuple[Path, ...]:
    """The held parts a rank running several parts of an expert-parallel stage loads, in
    the spec's order: `stage_dir` (the launch order's) for the first, then, for each other
    part (named by its node, the last component of `stages/<k>/nodes/<node>`), the held
    stage of the same model that is that node's part of the same stage of the same
    conversion (its manifest.json the first's); else LaunchError."""
    def meta(d: Path) -> tuple[int, str | None]:
        m = StageJson.load(d)
        return m.stage, m.node

    try:
        stage, first = meta(stage_dir)
        manifest = (stage_dir / "manifest.json").read_bytes()
    except (OSError, UserError) as e:
        raise LaunchError(f"stage {stage_dir.name}: {e}") from None
    if first != Path(names[0]).name:
        raise LaunchError(f"the held part is {first}'s, not the spec's first part {Path(names[0]).name}'s")
    out = [stage_dir]
    for name in (Path(n).name for n in names[1:]):
        for d in sorted(stage_dir.parent.iterdir()):
            try:
                if d != stage_dir and meta(d) == (stage, name) and (d / "manifest.json").read_bytes() == manifest:
                    out.append(d)
                    break
            except (OSError, UserError):
                continue
        else:
            raise LaunchError(f"{name}'s part of stage {stage} of this conversion is not held here")
    return tuple(out)


def worker_spec(spec: LaunchSpec, stage_dir: Path, hostfile_path: Path) -> WorkerSpec:
    """The coordinator's spec with this node's paths. A rank may run the whole layer range
    of a stage it holds, or a part of it (re-placement); only for the whole stage is the
    shard checked against its manifest (shard_root)."""
    have_start, have_end, num_layers = stage_layers(stage_dir)
    w = spec.worker
    if w.num_layers != num_layers:
        raise LaunchError(f"the model has {num_layers} layers here, not {w.num_layers}")
    if not have_start <= w.start < w.end <= have_end:
        raise LaunchError(f"layers [{w.start}, {w.end}) are not in the held stage "
                          f"[{have_start}, {have_end})")
    whole = (w.start, w.end) == (have_start, have_end)
    experts = held_experts(stage_dir)
    dirs = (stage_dir,)
    member = _member(w)
    if member and experts is None:  # a mixed plan's member from the whole stage: it keeps its experts on load
        if w.parts:
            raise LaunchError("bad spec: parts given for a member that runs from a whole stage")
    elif w.config.expert_parallel or member:
        if experts is None:
            raise LaunchError("an expert-parallel rank runs only from a held part of an expert-parallel "
                              "stage; this stage holds every expert")
        if w.parts:  # several parts: its rows are theirs, concatenated
            dirs = held_parts(stage_dir, w.parts)
            experts = tuple(e for d in dirs for e in held_experts(d) or ())
        if tuple(w.experts) != experts or not whole:
            raise LaunchError(f"the held part holds experts [{', '.join(map(str, experts))}] of layers "
                              f"[{have_start}, {have_end}), not the spec's [{', '.join(map(str, w.experts))}] "
                              f"of [{w.start}, {w.end})")
    elif experts is not None:
        raise LaunchError("the held stage is one node's part of an expert-parallel stage: it runs only "
                          "expert-parallel, with its own experts")
    shard_root = str(stage_dir) if whole and (stage_dir / "manifest.json").exists() else ""
    return replace(w, hostfile=str(hostfile_path), model_dir=str(stage_dir), shard_root=shard_root,
                   parts=tuple(str(d) for d in dirs) if w.parts else ())


class Workers:
    """Worker processes this node started, by (job, rank)."""

    def __init__(self, jobs_dir: Path) -> None:
        self.jobs_dir = Path(jobs_dir)
        self._procs: dict[tuple[str, int], subprocess.Popen] = {}
        self._lock = threading.Lock()

    def start(self, spec: LaunchSpec, stage_dir: Path) -> int:
        with self._lock:
            rank = spec.worker.rank
            if (spec.job, rank) in self._procs:
                raise LaunchError(f"job {spec.job} rank {rank} already running here")
            if len(self._procs) >= 16:
                self._reap()
                if len(self._procs) >= 16:
                    raise LaunchError("too many workers on this node")
            run_dir = self.jobs_dir / spec.job / f"rank{rank}"
            run_dir.mkdir(parents=True, exist_ok=True)
            hostfile = run_dir / "hostfile.json"
            hostfile.write_text(json.dumps([list(h) for h in spec.hostfile]))
            # the worker imports the same mlxdist as this node, installed or not
            root = str(Path(__file__).resolve().parents[2])
            env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile),
                       PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
            worker = worker_spec(spec, stage_dir, hostfile)  # refuses before anything runs
            log = open(run_dir / "worker.log", "wb")
            try:
                proc = start_worker(sys.executable, worker, env=env, cwd=run_dir, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            finally:
                log.close()
            self._procs[(spec.job, rank)] = proc
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
