"""ranks>1: a group of worker processes, driven over the control connection.

The engine listens on a TCP port; each worker connects, says hello (rank, host, pid) and
then sends a heartbeat every 0.5 s. A worker whose connection drops (it crashed or was
killed) or whose heartbeats stop for `heartbeat_timeout_s` (it hangs, or was SIGSTOPped)
fails the group: every request ends with an error naming the rank and host, and the
launcher kills every worker (survivors blocked in a ring recv included).
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from dataclasses import replace
from typing import Any, Callable

from mlxdist.framing import Channel, ProtocolError
from mlxdist.runtime.control import accept
from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.launcher import LocalLauncher, WorkerSpec, free_port
from mlxdist.runtime.messages import Add, Command, End, Event, Stop, event_from_wire, to_wire
from mlxdist.runtime.source import ModelSource

log = logging.getLogger("mlxdist.runtime.group")


class WorkerFailure(RuntimeError):
    """A worker died, hung or refused its stage; the message names rank and host."""


class WorkerGroupBackend:
    def __init__(self, source: ModelSource, config: EngineConfig, launcher: Any = None):
        self.n = len(source.stages)
        self.launcher = launcher or LocalLauncher()
        self.heartbeat_timeout_s = config.heartbeat_timeout_s
        self.session = secrets.token_hex(32)  # the group key that seals every control connection
        # the address workers dial may differ from the one to listen on (e.g. 0.0.0.0)
        bind = getattr(self.launcher, "control_bind", self.launcher.control_host)
        self.listener = socket.create_server((bind, 0))
        control = f"{self.launcher.control_host}:{self.listener.getsockname()[1]}"
        hosts = self.launcher.hosts(self.n)
        hostfile = self.launcher.ring_addresses(self.n)
        # NCCL's bootstrap listens on rank 0's host (where its ring address points)
        nccl = f"{hostfile[0][0].rsplit(':', 1)[0]}:{free_port()}" if config.handoff == "nccl" else ""
        config = replace(config, expert_parallel=source.expert_parallel)  # one rank runs a pipeline stage
        specs = [WorkerSpec(rank=p.rank, ranks=self.n, hostfile=self.launcher.hostfile_path(),
                            model_dir=str(p.model_dir), start=p.start, end=p.end,
                            num_layers=p.num_layers, control=control, session=self.session, config=config,
                            shard_root=str(source.root) if p.shard else "", host=hosts[p.rank],
                            experts=source.experts[p.rank] if source.experts else (), nccl=nccl,
                            parts=tuple(str(d) for d in p.parts))
                 for p in source.stages]
        self.hosts = hosts
        self.chans: dict[int, Channel] = {}
        self.last_seen: dict[int, float] = {}
        self.ready: set[int] = set()
        self.errors: dict[int, str] = {}  # what a worker said before it went
        self.gone: set[int] = set()  # ranks whose control connection dropped
        self.refused = 0  # connections dropped at the handshake (no group key, garbage)
        self.rank0_stats: dict[str, Any] = {}
        self.failure: str | None = None
        self.closing = False
        self._on_event: Callable[[dict], None] = lambda ev: None
        self._on_failure: Callable[[str], None] = lambda msg: None
        self._cond = threading.Condition()
        self.launcher.launch(specs, hostfile)
        try:
            self._await_ready(config.startup_timeout_s)
        except BaseException:
            self.launcher.terminate()
            self.listener.close()
            raise
        threading.Thread(target=self._monitor, name="mlxdist-monitor", daemon=True).start()

    # -- startup --------------------------------------------------------------------------
    def _await_ready(self, timeout: float) -> None:
        threading.Thread(target=self._accept, daemon=True).start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.ready) < self.n and self.failure is None:
                self.failure = self._exit_failure()
                if self.failure is None and time.monotonic() > deadline:
                    missing = sorted(set(range(self.n)) - self.ready)
                    self.failure = (f"{'rank' if len(missing) == 1 else 'ranks'} {', '.join(map(str, missing))} "
                                    f"did not become ready within {timeout:.0f} s")
                self._cond.wait(0.2)
        if self.failure:
            raise WorkerFailure(self.failure)

    def _accept(self) -> None:
        while len(self.chans) < self.n and not self.closing:
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return
            try:
                chan, hello = accept(sock, bytes.fromhex(self.session))
            except (ProtocolError, OSError) as e:
                self.refused += 1
                log.warning("refused a worker connection from %s: %s", peer[0], e)
                continue
            rank = int(hello["rank"])
            with self._cond:
                self.chans[rank] = chan
                self.last_seen[rank] = time.monotonic()
            threading.Thread(target=self._read, args=(rank, chan), daemon=True).start()

    # -- running --------------------------------------------------------------------------
    def start(self, on_event: Callable[[Event], None], on_failure: Callable[[str], None]) -> None:
        self._on_event, self._on_failure = on_event, on_failure
        if self.failure is not None:  # failed between ready and now: report it, not never
            on_failure(self.failure)

    def send(self, cmd: Command) -> None:
        if self.failure:
            return
        try:
            self.chans[0].send(to_wire(cmd))
            if isinstance(cmd, (Add, Stop)):  # parked followers wait for one wake per such command
                for rank in range(1, self.n):
                    self.chans[rank].send({"t": "wake"})
        except OSError:
            pass  # the reader notices the lost connection and reports it

    def stats(self) -> dict[str, Any]:
        """Rank 0's counters as of the last finished request (tokens, steps, runs, ticks,
        reused_tokens, ...), and the number of ranks."""
        return {**self.rank0_stats, "ranks": self.n}

    def _read(self, rank: int, chan: Channel) -> None:
        while True:
            try:
                msg = chan.recv()
            except ProtocolError as e:  # the stream is out of step: the connection is done
                self.errors[rank] = f"bad control frame: {e}"
                msg = None
            except ConnectionError:
                msg = None
            if msg is None:
                self.gone.add(rank)
                if not self.closing:
                    code = None
                    for _ in range(10):  # let the exit code arrive for a clearer message
                        code = self.launcher.poll().get(rank)
                        if code is not None:
                            break
                        time.sleep(0.05)
                    self._fail(self._describe(rank, code))
                return
            self.last_seen[rank] = time.monotonic()
            t = msg.get("t")
            if t == "hb":
                continue
            if t == "ready":
                with self._cond:
                    self.ready.add(rank)
                    self._cond.notify_all()
            elif t == "error":
                # A dead peer makes its neighbours' ring calls fail too: give the dead
                # rank's own report a moment to arrive, so the message names the cause.
                self.errors[rank] = str(msg.get("msg"))
                # (_describe names a rank that went without a word instead, if one did)
                threading.Timer(1.0, lambda r=rank: self._fail(self._describe(r, None))).start()
            elif (ev := event_from_wire(msg)) is not None:
                if isinstance(ev, End) and isinstance(ev.stats, dict):
                    self.rank0_stats = ev.stats
                self._on_event(ev)

    def _exit_failure(self) -> str | None:
        """What a worker that exited says, or None while all run."""
        for rank, code in self.launcher.poll().items():
            if code is not None and not self.closing:
                return self._describe(rank, code)
        return None

    def _describe(self, rank: int, code: int | None) -> str:
        # a survivor's ring error (and its exit) often arrives before the dead rank's end:
        # blame a rank that went without a word, if there is one
        silent = sorted(self.gone - set(self.errors) - {rank})
        if rank in self.errors and silent:
            rank, code = silent[0], self.launcher.poll().get(silent[0])
        where = f"rank {rank} on {self.hosts[rank]}"
        if rank in self.errors:
            return f"{where} failed: {self.errors[rank]}"
        if code is not None and code < 0:
            return f"{where} was killed by signal {-code}"
        if code is not None:
            tail = getattr(self.launcher, "log_tail", lambda r: "")(rank)
            return f"{where} exited with code {code}" + (f": {tail.splitlines()[-1]}" if tail else "")
        return f"{where} closed its control connection"

    def _monitor(self) -> None:
        while not self.closing and self.failure is None:
            time.sleep(0.25)
            now = time.monotonic()
            for rank in range(self.n):
                silent = now - self.last_seen.get(rank, now)
                if silent > self.heartbeat_timeout_s:
                    self._fail(f"rank {rank} on {self.hosts[rank]} stopped answering "
                               f"(no heartbeat for {silent:.1f} s)")
                    return
            msg = self._exit_failure()
            if msg:
                self._fail(msg)
                return

    def _fail(self, message: str) -> None:
        with self._cond:
            if self.failure is not None or self.closing:
                return
            self.failure = message
            self._cond.notify_all()
        self.launcher.terminate()
        self._on_failure(message)

    def close(self) -> None:
        if self.closing:
            return
        failed = self.failure is not None
        if not failed:
            self.send(Stop())
        self.closing = True  # from here on, workers leaving is what we asked for
        if not failed:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(c is None for c in self.launcher.poll().values()):
                time.sleep(0.05)
        self.launcher.terminate()
        self.listener.close()
        for c in self.chans.values():
            c.close()
