"""`ClusterEngine`: the runtime's Engine spread over cluster nodes, surviving node loss.

It places one stage per rank (rank k runs stage k; the nodes in ring order), delivers each
node the stages it lacks, and opens the runtime's engine with a `ClusterLauncher`. When a
node is lost (the runtime's heartbeats fail the group within `heartbeat_timeout_s`, 2.5 s),
the runtime calls `_on_failure`: it probes the nodes (those that do not answer are the
ones lost, whichever rank reported first), re-places their stages on the nodes left (where
memory allows; else every request ends with an error naming what is missing), delivers
them, and moves the engine there with `Engine.regroup`, which re-prefills every request in
flight with its prompt plus the tokens generated so far and keeps the request's own text
state (detokenizer, stop strings): the client sees a pause, not an error, and greedy
output and its text continue exactly where they stopped. When every node of the first
placement answers again and nothing is in flight, the model moves back.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from mlxdist.cluster.client import NodeClient
from mlxdist.cluster.coordinator import NodeView, deliver
from mlxdist.cluster.launcher import ClusterLauncher, Placement
from mlxdist.runtime.api import GenerationRequest, Health, Layout, NodeInfo

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


def layer_split(out_dir: Path) -> list[int]:
    """Layers per stage, from the manifest (the runtime's `split`)."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    split = [0] * len(manifest["stages"])
    for st in manifest["stages"]:
        split[st["stage"]] = st["layers"][1] - st["layers"][0]
    return split


def names(views: Sequence[NodeView]) -> list[str]:
    """Node names, each once, in order."""
    return list(dict.fromkeys(v.name for v in views))


def where(v: NodeView) -> str:
    return f"{v.name} ({v.host}:{v.port})"


def link_kind(a: NodeView, b: NodeView) -> str:
    """How `a` reaches `b`, as far as the nodes' interfaces tell."""
    if a.node_id == b.node_id or a.host.startswith("127.") or a.host in ("localhost", "::1"):
        return "loopback"
    if any(i.thunderbolt for i in a.interfaces) and any(i.thunderbolt for i in b.interfaces):
        return "thunderbolt"
    return "ethernet" if a.interfaces else "unknown"


def moved(before: Sequence[NodeView], after: Sequence[NodeView]) -> str:
    """'stage 2 moved from b to a, ...' for the stages whose node changed."""
    parts = [f"stage {k} moved from {b.name} to {a.name}"
             for k, (b, a) in enumerate(zip(before, after)) if b.node_id != a.node_id]
    return ", ".join(parts) or "no stage moved"


class ClusterEngine:
    def __init__(self, out_dir: Path, model: str, nodes: Sequence[NodeView], cluster: str,
                 secret: bytes, max_recoveries: int = 4, **engine_opts: Any) -> None:
        from mlxdist.runtime.engine import open_engine

        self.out_dir, self.model = Path(out_dir), model
        self.nodes = list(nodes)  # ring order; the first is the coordinator's own node
        self.cluster, self.secret = cluster, secret
        self.max_recoveries = max_recoveries
        # workers beat every 0.5 s; 2.5 s of silence leaves room to notice a loss in < 5 s.
        # A failed group is not the end of its requests: the runtime calls _on_failure,
        # which re-places and hands them over with Engine.regroup (text state and all)
        self.engine_opts = {"heartbeat_timeout_s": 2.5, **engine_opts,
                            "on_failure": self._on_failure}
        self.sizes = stage_bytes(self.out_dir)
        self.split = layer_split(self.out_dir)
        self.recoveries: list[dict] = []  # what happened, for tests and /metrics
        self._lock = threading.RLock()  # submits wait while the model moves
        self._fatal: str | None = None
        self._closed = False
        self.placement = place_stages(self.nodes, self.sizes)
        self._home = list(self.placement)  # where each stage runs when every node is up
        with self._lock:  # a failure hook waits until we are set up
            self._group = self._launcher(self.placement)  # the current group's launcher
            self._inner = open_engine(self.out_dir, ranks=len(self.placement),
                                      split=self.split, launcher=self._group,
                                      **self.engine_opts)
        self._stop = threading.Event()
        threading.Thread(target=self._take_back_loop, name="mlxdist-take-back",
                         daemon=True).start()
        self.model_name = engine_opts.get("model_name") or model
        self.tokenizer = self._inner.tokenizer
        self.context_length = self._inner.context_length
        self.max_concurrent = self._inner.max_concurrent

    # -- placement and moving -------------------------------------------------------------
    def _launcher(self, placement: list[NodeView]) -> ClusterLauncher:
        """Deliver each node the stages `placement` gives it; the launcher for rank k on
        placement[k]."""
        assignments: dict[str, list] = {}
        for k, v in enumerate(placement):
            assignments.setdefault(v.node_id, []).append(
                (self.out_dir / "stages" / str(k), self.model, k))
        deliver({v.node_id: v for v in placement}, assignments, self.cluster, self.secret)
        return ClusterLauncher([Placement(v, self.model, k) for k, v in enumerate(placement)],
                               self.cluster, self.secret)

    def _move(self, placement: list[NodeView]) -> None:
        """Run the model on `placement` from now on; requests in flight are carried over
        (re-prefilled with their tokens so far; their text goes on where it stopped)."""
        launcher = self._launcher(placement)
        self._inner.regroup(ranks=len(placement), split=self.split, launcher=launcher)
        self._group, self.placement = launcher, placement

    def _alive(self, timeout: float = 2.0) -> list[NodeView]:
        """The nodes that answer a ping within `timeout` s, asked all at once."""
        def answers(v: NodeView) -> bool:
            try:
                with NodeClient(v.host, v.port, self.secret, self.cluster, timeout=timeout) as c:
                    c.settimeout(timeout)
                    c.ping()
                return True
            except Exception:
                return False

        with cf.ThreadPoolExecutor(max_workers=min(16, len(self.nodes))) as pool:
            return [v for v, ok in zip(self.nodes, pool.map(answers, self.nodes)) if ok]

    def _on_failure(self, engine: Any, message: str) -> None:
        """The runtime's failure hook (its own thread): probe the nodes, re-place the
        stages of the lost ones on the nodes left and carry every request over, or end
        them all with an error naming what is missing. `message` is the runtime's first
        report, which may come from a survivor (its ring peer vanished); the nodes that
        no longer answer are the ones lost."""
        with self._lock:
            if not self._group.terminated:  # the group running now has not failed: this
                return  # is a second report of a failure already handled
            if self._closed or self._fatal:
                engine.fail(self._fatal or message)
                return
            t0, noticed_at = time.monotonic(), time.time()
            alive = self._alive()
            up = {v.node_id for v in alive}
            lost = [v for v in dict((v.node_id, v) for v in self.placement).values()
                    if v.node_id not in up]
            what = f"{', '.join(map(where, lost))} lost" if lost else "a worker failed"
            before, fatal = list(self.placement), None
            if sum(r["reason"] != "nodes back" for r in self.recoveries) >= self.max_recoveries:
                fatal = f"{what}: {message} (gave up after {self.max_recoveries} re-placements)"
            else:
                current = {k: v.node_id for k, v in enumerate(self.placement)}
                try:
                    self._move(place_stages(alive, self.sizes, current))
                except PlacementError as e:
                    fatal = f"{what}: {message}; the model no longer fits on the nodes left: {e}"
                except Exception as e:
                    fatal = f"{what}: {message}; re-placement failed: {type(e).__name__}: {e}"
            self.recoveries.append({"reason": message, "lost": [v.name for v in lost],
                                    "noticed_at": noticed_at,
                                    "seconds": time.monotonic() - t0,
                                    "nodes": [v.name for v in alive], "fatal": fatal})
            if fatal:
                self._fatal = fatal
                log.error("%s", fatal)
                engine.fail(fatal)
                return
            log.warning("%s; %s; now on %s (in %.1f s; first report: %s)", what,
                        moved(before, self.placement), [v.name for v in self.placement],
                        time.monotonic() - t0, message)

    def _take_back_loop(self, interval_s: float = 2.0) -> None:
        """A node that comes back gets its stages back, at a moment with no request in
        flight (so nobody waits for the model to move)."""
        while not self._stop.wait(interval_s):
            if self._fatal or self._closed or self.placement == self._home or self._busy():
                continue
            up = {v.node_id for v in self._alive()}
            if any(v.node_id not in up for v in self._home):
                continue
            with self._lock:
                if self._fatal or self._closed or self.placement == self._home or self._busy():
                    continue
                self._take_back()

    def _busy(self) -> bool:
        return bool(self._inner.in_flight_state())

    def _take_back(self) -> None:
        t0, before = time.monotonic(), list(self.placement)
        held = {v.node_id for v in before}
        back = list({v.node_id: v for v in self._home if v.node_id not in held}.values())
        try:
            self._move(list(self._home))
        except Exception as e:  # stay on the nodes left; the next failure re-places again
            log.warning("could not move back to %s: %s", ", ".join(map(where, back)), e)
            try:
                current = {k: v.node_id for k, v in enumerate(before)}
                self._move(place_stages(self._alive(), self.sizes, current))
            except Exception as e2:
                self._fatal = f"re-placement failed: {type(e2).__name__}: {e2}"
                log.error("%s", self._fatal)
                self._inner.fail(self._fatal)
            return
        self.recoveries.append({"reason": "nodes back", "back": names(back),
                                "noticed_at": time.time(), "seconds": time.monotonic() - t0,
                                "nodes": names(self._home), "fatal": None})
        log.warning("%s back; %s; now on %s (in %.1f s)", ", ".join(map(where, back)),
                    moved(before, self.placement), [v.name for v in self.placement],
                    time.monotonic() - t0)

    # -- the Engine interface -------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Any:
        if self._fatal:
            raise RuntimeError(self._fatal)
        with self._lock:  # not while the model moves: regroup carries only what it saw
            return self._inner.submit(request)

    def generate(self, prompt: Sequence[int], max_tokens: int = 64) -> list[int]:
        return self.submit(GenerationRequest(tuple(prompt), max_tokens)).tokens()

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        return self._inner.encode_chat(messages)

    def stats(self) -> dict[str, float]:
        out = dict(self._inner.stats())
        out["replacements"] = float(len(self.recoveries))
        out["nodes"] = float(len({v.node_id for v in self.placement}))
        return out

    @property
    def failure(self) -> str | None:
        return self._fatal

    def health(self) -> Health:
        return Health("down", self._fatal) if self._fatal else self._inner.health()

    def layout(self) -> Layout:
        """The inner engine's stages on the nodes that run them, and every node known."""
        inner = self._inner.layout()
        stages = tuple(replace(st, node=self.placement[st.rank].name) for st in inner.stages
                       if st.rank < len(self.placement))
        running = {v.node_id for v in self.placement}
        lost = set(self.recoveries[-1].get("lost") or ()) if self.recoveries else set()
        ring = list(dict.fromkeys(v.node_id for v in self.placement))
        by_id = {v.node_id: v for v in self.nodes}
        nodes = []
        for v in self.nodes:
            health = "ok" if v.node_id in running else ("lost" if v.name in lost else "idle")
            links: tuple[tuple[str, str], ...] = ()
            if v.node_id in running and len(ring) > 1:  # its ring neighbour
                nxt = by_id[ring[(ring.index(v.node_id) + 1) % len(ring)]]
                links = ((nxt.name, link_kind(v, nxt)),)
            nodes.append(NodeInfo(v.name, v.host, v.chip, health, v.memory_total or None,
                                  v.memory_available or None, links))
        return Layout("nodes", inner.num_layers, stages, tuple(nodes))

    def events(self) -> list[dict]:
        """Node losses, re-placements and returns, with the inner engine's own (requests
        carried over), newest last."""
        out = []
        for r in self.recoveries:
            t = float(r.get("noticed_at") or 0.0)
            if r.get("reason") == "nodes back":
                out.append({"t": t, "event": "nodes_back", "message": f"{', '.join(r.get('back') or [])} back; "
                            f"stages moved home in {r.get('seconds', 0):.1f} s"})
                continue
            out.append({"t": t, "event": "node_lost", "message": f"{', '.join(r.get('lost') or []) or 'a worker'} "
                        f"lost: {r.get('reason')}"})
            if r.get("fatal"):
                out.append({"t": t, "event": "fatal", "message": str(r["fatal"])})
            else:
                out.append({"t": t + float(r.get("seconds") or 0), "event": "replaced",
                            "message": f"re-placed in {r.get('seconds', 0):.1f} s on {', '.join(r.get('nodes') or [])}"})
        return sorted(out + self._inner.events(), key=lambda e: e["t"])[-50:]

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        with self._lock:
            self._inner.close()
