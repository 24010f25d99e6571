"""`ClusterEngine`: the runtime's Engine spread over cluster nodes, surviving node loss.

It places one stage per rank (rank k runs stage k; the nodes in ring order), delivers each
node the stages it lacks, and opens the runtime's engine with a `ClusterLauncher`. When a
node is lost (the runtime's heartbeats fail the group within `heartbeat_timeout_s`, 2.5 s), it
probes the nodes, re-places the lost stages on the nodes left (where memory allows; else
every request ends with an error naming what is missing), delivers them, opens a new
engine, and re-submits every request in flight as its prompt plus the tokens generated so
far, with the remaining token budget: the client sees a pause, not an error (greedy
output continues exactly where it stopped). Only when nothing fits do requests end.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from mlxdist.cluster.client import NodeClient
from mlxdist.cluster.coordinator import NodeView, deliver
from mlxdist.cluster.launcher import ClusterLauncher, Placement
from mlxdist.runtime.api import GenerationRequest, TokenEvent

log = logging.getLogger("mlxdist.cluster.engine")


class PlacementError(Exception):
    """The model does not fit on the nodes left."""


def stage_bytes(out_dir: Path) -> list[int]:
    manifest = json.loads((out_dir / "manifest.json").read_text())
    sizes = []
    for st in sorted(manifest["stages"], key=lambda s: s["stage"]):
        d = out_dir / "stages" / str(st["stage"])
        sizes.append(sum(p.stat().st_size for p in d.iterdir() if p.is_file()))
    return sizes


def place_stages(nodes: Sequence[NodeView], sizes: Sequence[int],
                 current: dict[int, str] | None = None) -> list[NodeView]:
    """Which node runs each stage. Stages stay where they ran while their node is alive;
    the others go to the node with the most memory left. Pure; raises PlacementError."""
    by_id = {v.node_id: v for v in nodes}
    free = {v.node_id: v.memory_available for v in nodes}
    out: list[NodeView | None] = [None] * len(sizes)
    if current is None:  # first placement: stage k on the k-th node, as many as there are
        current = {k: nodes[k].node_id for k in range(min(len(nodes), len(sizes)))}
    for k, nid in current.items():
        if nid in by_id and free[nid] >= sizes[k]:
            out[k] = by_id[nid]
            free[nid] -= sizes[k]
    for k in range(len(sizes)):
        if out[k] is None:
            nid = max(free, key=lambda n: free[n]) if free else None
            if nid is None or free[nid] < sizes[k]:
                have = f"{by_id[nid].name} has {free[nid] / 2**30:.2f} GiB free" if nid else \
                    "no node is left"
                raise PlacementError(f"stage {k} needs {sizes[k] / 2**30:.2f} GiB; {have}")
            out[k] = by_id[nid]
            free[nid] -= sizes[k]
    return out  # type: ignore[return-value]


class _Handle:
    """What the client holds; survives re-placements of the engine beneath it."""

    def __init__(self, request_id: int, request: GenerationRequest) -> None:
        self.request_id = request_id
        self.request = request
        self.generated: list[int] = []
        self.events: queue.Queue[TokenEvent] = queue.Queue()
        self.inner: Any = None
        self.cancelled = False

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            ev = self.events.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def cancel(self) -> None:
        self.cancelled = True
        if self.inner is not None:
            self.inner.cancel()

    def tokens(self) -> list[int]:
        return [e.token for e in self if e.token is not None]


class ClusterEngine:
    def __init__(self, out_dir: Path, model: str, nodes: Sequence[NodeView], cluster: str,
                 secret: bytes, max_recoveries: int = 4, **engine_opts: Any) -> None:
        self.out_dir, self.model = Path(out_dir), model
        self.nodes = list(nodes)  # ring order; the first is the coordinator's own node
        self.cluster, self.secret = cluster, secret
        self.max_recoveries = max_recoveries
        # workers beat every 0.5 s; 2.5 s of silence leaves room to notice a loss in < 5 s
        self.engine_opts = {"heartbeat_timeout_s": 2.5, **engine_opts}
        self.sizes = stage_bytes(self.out_dir)
        self.placement: list[NodeView] = []
        self.recoveries: list[dict] = []  # what happened, for tests and /metrics
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._generation = 0
        self._fatal: str | None = None
        self._closed = False
        self._inner = self._open(place_stages(self.nodes, self.sizes))
        self._home = list(self.placement)  # where each stage runs when every node is up
        self._handles: dict[int, _Handle] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._take_back_loop, name="mlxdist-take-back",
                         daemon=True).start()
        self.model_name = engine_opts.get("model_name") or model
        self.tokenizer = self._inner.tokenizer
        self.context_length = self._inner.context_length
        self.max_concurrent = self._inner.max_concurrent

    # -- placement and (re)opening ---------------------------------------------------------
    def _open(self, placement: list[NodeView]) -> Any:
        from mlxdist.runtime.engine import open_engine

        assignments: dict[str, list] = {}
        views = {v.node_id: v for v in placement}
        for k, v in enumerate(placement):
            assignments.setdefault(v.node_id, []).append(
                (self.out_dir / "stages" / str(k), self.model, k))
        deliver(views, assignments, self.cluster, self.secret)
        launcher = ClusterLauncher([Placement(v, self.model, k) for k, v in enumerate(placement)],
                                   self.cluster, self.secret)
        split = [0] * len(self.sizes)
        manifest = json.loads((self.out_dir / "manifest.json").read_text())
        for st in manifest["stages"]:
            split[st["stage"]] = st["layers"][1] - st["layers"][0]
        engine = open_engine(self.out_dir, ranks=len(placement), split=split, launcher=launcher,
                             **self.engine_opts)
        self.placement = placement
        return engine

    def _alive(self) -> list[NodeView]:
        alive = []
        for v in self.nodes:
            try:
                with NodeClient(v.host, v.port, self.secret, self.cluster, timeout=1.0) as c:
                    c.settimeout(1.0)
                    c.ping()
                alive.append(v)
            except Exception:
                continue
        return alive

    def _recover(self, seen_generation: int) -> None:
        """Replace the failed engine (once per failure, whoever notices first)."""
        with self._lock:
            if self._generation != seen_generation or self._fatal or self._closed:
                return
            t0, noticed_at = time.monotonic(), time.time()
            reason = self._inner.failure or "engine failed"
            try:
                self._inner.close()
            except Exception:
                pass
            if len(self.recoveries) >= self.max_recoveries:
                self._fatal = f"{reason} (gave up after {self.max_recoveries} re-placements)"
                return
            alive = self._alive()
            current = {k: v.node_id for k, v in enumerate(self.placement)}
            try:
                placement = place_stages(alive, self.sizes, current)
                self._inner = self._open(placement)
            except PlacementError as e:
                self._fatal = f"{reason}; the model no longer fits on the nodes left: {e}"
                return
            except Exception as e:
                self._fatal = f"{reason}; re-placement failed: {type(e).__name__}: {e}"
                return
            finally:
                self.recoveries.append({"reason": reason, "noticed_at": noticed_at,
                                        "seconds": time.monotonic() - t0,
                                        "nodes": [v.name for v in alive],
                                        "fatal": self._fatal})
            self._generation += 1
            log.warning("re-placed after %r on %s in %.1f s", reason,
                        [v.name for v in self.placement], time.monotonic() - t0)

    def _take_back_loop(self, interval_s: float = 2.0) -> None:
        """A node that comes back gets its stages back, at a moment with no request in
        flight (so nobody waits for the model to move)."""
        while not self._stop.wait(interval_s):
            if self._fatal or self.placement == self._home or self._handles:
                continue
            if len(self._alive()) < len({v.node_id for v in self._home}):
                continue
            with self._lock:
                if self._handles or self._closed or self.placement == self._home:
                    continue
                t0 = time.monotonic()
                try:
                    self._inner.close()
                    self._inner = self._open(list(self._home))
                    self._generation += 1
                    self.recoveries.append({"reason": "nodes back", "noticed_at": time.time(),
                                            "seconds": time.monotonic() - t0,
                                            "nodes": [v.name for v in self._home],
                                            "fatal": None})
                except Exception as e:  # stay down; the next failure re-places again
                    log.warning("could not take the nodes back: %s", e)
                    try:
                        self._inner = self._open(place_stages(self._alive(), self.sizes))
                        self._generation += 1
                    except Exception as e2:
                        self._fatal = f"re-placement failed: {type(e2).__name__}: {e2}"

    # -- the Engine interface -------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> _Handle:
        if self._fatal:
            raise RuntimeError(self._fatal)
        handle = _Handle(next(self._ids), request)
        with self._lock:
            generation = self._generation
            handle.inner = self._inner.submit(request)
            self._handles[handle.request_id] = handle
        threading.Thread(target=self._relay, args=(handle, generation), daemon=True).start()
        return handle

    def _relay(self, h: _Handle, generation: int) -> None:
        try:
            self._relay_events(h, generation)
        finally:
            with self._lock:
                self._handles.pop(h.request_id, None)

    def _relay_events(self, h: _Handle, generation: int) -> None:
        while True:
            failed = False
            for ev in h.inner:
                if ev.finish_reason == "error" and not h.cancelled and not self._closed:
                    failed = True
                    break
                if ev.token is not None:
                    h.generated.append(ev.token)
                h.events.put(ev)
                if ev.finish_reason is not None:
                    return
            if not failed:
                return
            self._recover(generation)
            with self._lock:
                if self._fatal:
                    h.events.put(TokenEvent(None, "", finish_reason="error", error=self._fatal))
                    return
                generation = self._generation
                r = h.request
                left = r.max_tokens - len(h.generated)
                # re-prefill: the prompt plus what was generated, for the tokens still due
                h.inner = self._inner.submit(replace(
                    r, prompt_tokens=tuple(r.prompt_tokens) + tuple(h.generated),
                    max_tokens=left))

    def generate(self, prompt: Sequence[int], max_tokens: int = 64) -> list[int]:
        return self.submit(GenerationRequest(tuple(prompt), max_tokens)).tokens()

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        return self._inner.encode_chat(messages)

    def stats(self) -> dict[str, float]:
        with self._lock:
            out = dict(self._inner.stats())
        out["replacements"] = float(len(self.recoveries))
        out["nodes"] = float(len({v.node_id for v in self.placement}))
        return out

    @property
    def failure(self) -> str | None:
        return self._fatal

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        with self._lock:
            self._inner.close()
