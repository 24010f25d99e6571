"""How worker processes get started: pluggable. Every worker is `python -m
mlxdist.runtime.worker` with its `WorkerSpec` on stdin. `LocalLauncher` runs them as
subprocesses of this machine (ring over 127.0.0.1); the cluster supplies a launcher whose
nodes start the same command with the same spec, sent in their launch orders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from mlxdist.errors import UserError, plural
from mlxdist.runtime.config import EngineConfig, check_fields, pack, unpack


WORKER_ARGV = ("-m", "mlxdist.runtime.worker")  # the whole command line: the spec comes on stdin


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker needs: this rank's facts and the engine's config. It travels
    as one msgpack blob (`to_msgpack`) on the worker's stdin, never on a command line
    (`session` is a secret)."""

    rank: int
    ranks: int
    hostfile: str  # path on the worker's host; the launcher writes it there
    model_dir: str  # an mlx-lm directory, or the stage directory of a shard
    start: int
    end: int
    num_layers: int
    control: str  # host:port of the engine's control server
    session: str  # the key the worker proves it holds in its hello
    config: EngineConfig
    shard_root: str = ""  # shard directory holding manifest.json, when model_dir is a stage
    host: str = "127.0.0.1"  # how this rank is named in messages
    # with config.expert_parallel: this rank's expert ids ((): an even split); with config.stages
    # (a mixed plan): a member's of the expert-parallel stage, () on a pipeline stage's rank
    experts: tuple[int, ...] = ()
    nccl: str = ""  # with handoff nccl: HOST:PORT of NCCL's rank 0
    # with config.expert_parallel, a rank running several parts of the stage (after a node
    # loss): their directories (`stages/<k>/nodes/<node>`), in row order, model_dir the first
    parts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0 <= self.rank < self.ranks:
            raise ValueError(f"WorkerSpec.rank: {self.rank} is not within 0..{self.ranks - 1}")
        if not 0 <= self.start < self.end <= self.num_layers:
            raise ValueError(f"WorkerSpec.start/end: [{self.start}, {self.end}) is not a layer range "
                             f"of {self.num_layers}")

    def to_msgpack(self) -> bytes:
        return pack(self)

    @classmethod
    def from_msgpack(cls, blob: bytes) -> "WorkerSpec":
        return unpack(cls, blob)


def start_worker(python: str, spec: WorkerSpec, **popen: Any) -> subprocess.Popen:
    """`python -m mlxdist.runtime.worker`, its spec written to its stdin."""
    proc = subprocess.Popen([python, *WORKER_ARGV], stdin=subprocess.PIPE, **popen)
    try:
        proc.stdin.write(spec.to_msgpack())
        proc.stdin.close()
    except BrokenPipeError:  # it died at once: poll() says how
        pass
    return proc


class Launcher(Protocol):
    control_host: str  # address the workers use to reach the engine's control server
    # optional: control_bind (address the engine listens on; default control_host)

    def ring_addresses(self, ranks: int) -> list[list[str]]: ...
    def hosts(self, ranks: int) -> list[str]: ...
    def hostfile_path(self) -> str: ...  # where each worker finds the hostfile on its host
    def launch(self, specs: list[WorkerSpec], hostfile: list[list[str]]) -> None: ...
    def poll(self) -> dict[int, int | None]: ...  # rank -> exit code (None: running)
    def terminate(self) -> None: ...  # kill every worker, wait for them


TAIL_LINES = 20  # log lines per rank kept for log_tail once the log directory is gone


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def one_gpu_per_rank(ranks: int, visible: str | None) -> Callable[[int], dict[str, str]]:
    """Each rank's environment when every rank needs its own GPU (NCCL refuses two ranks
    on one): rank r gets the r-th GPU this process may use (CUDA_VISIBLE_DEVICES, else 0, 1, ...)."""
    ids = [v.strip() for v in (visible or "").split(",") if v.strip()] or [str(r) for r in range(ranks)]
    if len(ids) < ranks:
        raise UserError(f"{plural(ranks, 'rank')} need a GPU each for NCCL; "
                        f"CUDA_VISIBLE_DEVICES lists {len(ids)}")
    return lambda rank: {"CUDA_VISIBLE_DEVICES": ids[rank]}


SHARED_DEVICE_ENV = "MLXDIST_SHARED_DEVICE"  # set for local ranks that share one device


def shares_device(rank_envs: list[dict[str, str]]) -> bool:
    """Whether local ranks with these environments share a device: not each given a GPU
    of its own (CUDA_VISIBLE_DEVICES unset, or the same for two of them). Every rank is
    told; rank 0 then runs one decoding group on a GPU (worker.py)."""
    seen = [env.get("CUDA_VISIBLE_DEVICES") for env in rank_envs]
    return len(seen) > 1 and (None in seen or len(set(seen)) < len(seen))


class LocalLauncher:
    """Workers as subprocesses of this machine. Their hostfile and logs (rank<N>.log) go to
    `log_dir` when given (kept), else to a temporary directory of our own that
    `terminate()` removes once the workers are dead, keeping each rank's last log lines in
    memory for `log_tail`. So `terminate()` (the group calls it on failure and on close)
    is all the clean-up there is; `cleanup()` alone is for a launcher that never launched."""

    control_host = "127.0.0.1"

    def __init__(self, python: str = sys.executable, log_dir: str | None = None,
                 rank_env: Callable[[int], dict[str, str]] | None = None):
        self.python = python
        # extra environment per rank, e.g. one GPU each: {"CUDA_VISIBLE_DEVICES": str(rank)}
        self.rank_env = rank_env or (lambda rank: {})
        self.owns_dir = log_dir is None
        self.dir = Path(log_dir or tempfile.mkdtemp(prefix="mlxdist-run-"))
        self.procs: dict[int, subprocess.Popen] = {}
        self._tails: dict[int, list[str]] = {}  # each rank's last log lines, kept at clean-up
        if self.owns_dir:  # dropped without terminate() (an error before launch): removed at exit
            weakref.finalize(self, shutil.rmtree, str(self.dir), True)

    def ring_addresses(self, ranks: int) -> list[list[str]]:
        return [[f"127.0.0.1:{free_port()}"] for _ in range(ranks)]

    def hosts(self, ranks: int) -> list[str]:
        return ["127.0.0.1"] * ranks

    def hostfile_path(self) -> str:
        return str(self.dir / "hostfile.json")

    def launch(self, specs: list[WorkerSpec], hostfile: list[list[str]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)  # again, if an earlier terminate() removed it
        Path(self.hostfile_path()).write_text(json.dumps(hostfile))
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        shared = shares_device([self.rank_env(spec.rank) for spec in specs])
        for spec in specs:
            self._tails.pop(spec.rank, None)
            log = open(self.dir / f"rank{spec.rank}.log", "wb")
            self.procs[spec.rank] = start_worker(
                self.python, spec, stdout=log, stderr=log,
                env={**env, **self.rank_env(spec.rank), **({SHARED_DEVICE_ENV: "1"} if shared else {})},
                start_new_session=True)
            log.close()

    def poll(self) -> dict[int, int | None]:
        return {r: p.poll() for r, p in self.procs.items()}

    def log_tail(self, rank: int, lines: int = 5) -> str:
        """The last `lines` lines of the rank's log: read from the file, or once
        terminate() has removed it, from the last TAIL_LINES lines kept in memory."""
        text = self._log_lines(rank)
        return "\n".join((self._tails.get(rank, []) if text is None else text)[-lines:])

    def _log_lines(self, rank: int) -> list[str] | None:
        try:
            return (self.dir / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return None

    def terminate(self) -> None:
        """Kill every worker and wait for them, then `cleanup()`."""
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # its own session: only what it started
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.cleanup()

    def cleanup(self) -> None:
        """Remove our temporary directory (never a caller's log_dir), keeping each rank's
        last log lines for log_tail. Safe to call more than once."""
        if not self.owns_dir:
            return
        for rank in list(self.procs):
            text = self._log_lines(rank)
            if text is not None:
                self._tails[rank] = text[-TAIL_LINES:]
        shutil.rmtree(self.dir, ignore_errors=True)
