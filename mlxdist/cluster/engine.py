"""`ClusterEngine`: the runtime's Engine spread over cluster nodes, surviving node loss.

It runs exactly the `Plan` it is given (`open_cluster_engine` gets it from the planner,
`placement.planner.plan_stages`, or from the user's `--plan`): rank k runs stage k on
`plan.stages[k].nodes[0]`, the ranks in `plan.group` order. It delivers each node the
stages it lacks and opens the runtime's engine with a `ClusterLauncher`. When a node is
lost (the runtime's heartbeats fail the group within `heartbeat_timeout_s`, 2.5 s), the
runtime calls `_on_failure`: it probes the nodes (those that do not answer are the ones
lost, whichever rank reported first), asks the planner again for the nodes left, the
stages kept where they ran (else every request ends with an error naming what is
missing), delivers them, and moves the engine there with `GroupEngine.regroup`, which
re-prefills every request in flight with its prompt plus the tokens generated so far and
keeps the request's own text state (detokenizer, stop strings): the client sees a pause,
not an error, and greedy output and its text continue exactly where they stopped. When
every node of the first plan answers again and nothing is in flight, the model moves back
to it.

An expert-parallel plan (one stage over the whole group, docs/placement.md) runs rank r on
`plan.group[r]` from the parts of the conversion it holds (`stages/0/nodes/<node>/`, each
holding one node's experts only; at first each node is sent its own part alone). A lost
node's parts exist only on the coordinator, so they are re-placed whole: the planner
(`plan_expert_parts`) keeps every other part where it runs and gives each orphaned part
to a survivor with room, which is sent it, and the requests are carried over as above;
only when nothing fits does every request end with an error naming the node and its
experts. The model does not move back to a node that returns (take-back is for pipeline
plans only).

A mixed plan (pipeline stages and one expert-parallel stage over some consecutive ranks
after rank 0, docs/placement.md) runs its ranks in the plan's group order with the
runtime's `EngineConfig.stages` (`mixed.layout_from_plan`), no split: each pipeline rank
from its stage's directory, each member of the expert-parallel stage from its node's part
(`stages/<k>/nodes/<node>/`), or, for a conversion without parts, from the stage's
directory (sliced on load). A lost node's ranks move whole to nodes left with room
(`Conversion.mixed_on`), the stages and experts unchanged; no take-back.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from mlxdist.cluster.client import NodeClient
from mlxdist.cluster.inventory import Conversion
from mlxdist.cluster.launcher import ClusterLauncher, Placement
from mlxdist.cluster.nodes import NodeView, deliver, link_kind, where
from mlxdist.errors import UserError
from mlxdist.placement.plan import Plan, Stage, expert_ids, rank_words
from mlxdist.placement.planner import Request
from mlxdist.runtime.api import GenerationRequest, Health, Layout, NodeInfo
from mlxdist.runtime.config import EngineConfig
from mlxdist.shard_format import part_dir, stage_dir

log = logging.getLogger("mlxdist.cluster.engine")


def ranks_on(plan: Plan, views: Sequence[NodeView]) -> list[NodeView]:
    """The node of each rank, by name among `views`: stage k's node for a pipeline plan,
    the stage's nodes in order for one expert-parallel stage over the group."""
    by_name = {v.name: v for v in views}
    return [by_name[n] for st in plan.stages for n in st.nodes]


def rank_shards(plan: Plan, conversion: Conversion, out_dir: Path) -> list[list[tuple[Path, int]]]:
    """What each rank of `plan` runs from, in rank (group) order: [(directory to deliver,
    the stage number the node holds it as)], the first the one it is launched from.
    A pipeline rank: its stage's directory `stages/<k>/`, as stage k. A member of an
    expert-parallel stage k cut into per-node parts: the parts it runs, in its row order
    (`stages/<k>/nodes/<node>/`, part i held as stage `conversion.held_as(k, i)`, so one
    node can hold several); of a stage without parts (a mixed plan served from a
    conversion cut by layers only): the stage's directory, sliced on load."""
    out: list[list[tuple[Path, int]]] = []
    for k, st in enumerate(plan.stages):
        parts = conversion.parts[k] if k < len(conversion.parts) else ()
        if not st.expert_parallel or not parts:
            out += [[(out_dir / stage_dir(k), k)] for _ in st.nodes]
            continue
        out += [[(out_dir / part_dir(k, parts[i][0]), conversion.held_as(k, i)) for i in mine]
                for mine in conversion.parts_of(plan, k)]
    return out


def config_for(plan: Plan, config: EngineConfig) -> EngineConfig:
    """`config` running `plan`: an expert-parallel plan's experts per rank, a mixed plan's
    stages (`mixed.layout_from_plan`, ranks in its group order); a pipeline's as it is."""
    kind = plan.kind
    if kind == "expert-parallel":
        st = plan.stages[0]
        return replace(config, expert_parallel=True, experts=tuple(st.experts_of(n) for n in st.nodes))
    if kind == "mixed":
        from mlxdist.runtime.mixed import layout_from_plan

        return replace(config, expert_parallel=False, experts=(), stages=layout_from_plan(plan))
    return config


def ranks_moved(before: Plan, after: Plan) -> str:
    """'rank 2 (layers 2-4, experts 4-7 of the expert-parallel stage 1) moved from n2 to
    n0, ...' for the ranks of a mixed plan whose node changed."""
    out = [f"{rank_words(before, r)} moved from {a} to {b}"
           for r, (a, b) in enumerate(zip(before.group, after.group)) if a != b]
    return ", ".join(out) or "no rank moved"


def ranks_lost(plan: Plan, lost: Sequence[NodeView], alive: Sequence[NodeView], message: str,
               refusal: str) -> str:
    """The one-line error that ends the requests of a mixed `plan` when the ranks of the
    `lost` nodes fit on no node left (`refusal`, the planner's numbers, says why)."""
    gone = {v.name for v in lost}
    held = ", ".join(rank_words(plan, r) for r, n in enumerate(plan.group) if n in gone)
    left = ", ".join(v.name for v in alive) or "none"
    first = (message.strip().splitlines() or [""])[0]
    return (f"{', '.join(map(where, lost))} lost, which ran {held}; no node left ({left}) can take "
            f"{'them' if ', rank' in held else 'it'}: {refusal} (first report: {first})")


def experts_lost(stage: Stage, lost: Sequence[NodeView], alive: Sequence[NodeView], message: str,
                 refusal: str = "") -> str:
    """The one-line error that ends the requests of an expert-parallel `stage` when nodes
    are lost: their experts are held by no other node, so no request can finish without
    them; `refusal`, the planner's, says why no node left can take them."""
    held = "; ".join(f"{where(v)} lost, which held experts {expert_ids(stage.experts_of(v.name))}"
                     for v in lost)
    left = ", ".join(v.name for v in alive) or "none"
    first = (message.strip().splitlines() or [""])[0]
    why = f" and none of them can take them: {refusal}" if refusal else ""
    return (f"{held} of the expert-parallel stage; no other node holds them, so requests cannot finish "
            f"on the nodes left ({left}){why} (first report: {first})")


def names(views: Sequence[NodeView]) -> list[str]:
    """Node names, each once, in order."""
    return list(dict.fromkeys(v.name for v in views))


def parts_moved(parts: Sequence[tuple[str, Sequence[int]]], before: dict[int, str], after: dict[int, str]) -> str:
    """'part of n2 (experts 6-7) moved from n2 to n0, ...' for the expert parts whose node
    changed (`before`/`after`: part -> node name)."""
    out = [f"part of {parts[i][0]} (experts {expert_ids(parts[i][1])}) moved from {before[i]} to {after[i]}"
           for i in sorted(after) if before.get(i) != after[i]]
    return ", ".join(out) or "no part moved"


def moved(before: Sequence[NodeView], after: Sequence[NodeView]) -> str:
    """'stage 2 moved from b to a, ...' for the stages whose node changed."""
    parts = [f"stage {k} moved from {b.name} to {a.name}"
             for k, (b, a) in enumerate(zip(before, after)) if b.node_id != a.node_id]
    return ", ".join(parts) or "no stage moved"


class ClusterEngine:
    def __init__(self, out_dir: Path, model: str, nodes: Sequence[NodeView], conversion: Conversion,
                 plan: Plan, cluster: str, secret: bytes, max_recoveries: int = 4,
                 config: EngineConfig = EngineConfig()) -> None:
        from mlxdist.runtime.engine import open_engine

        self.out_dir, self.model = Path(out_dir), model
        self.nodes = list(nodes)  # every healthy node, ring order; the first is the coordinator's own
        self.cluster, self.secret = cluster, secret
        self.max_recoveries = max_recoveries
        # workers beat every 0.5 s; 2.5 s of silence (at most) leaves room to notice a loss in < 5 s.
        # A failed group is not the end of its requests: the runtime calls _on_failure,
        # which re-places and hands them over with GroupEngine.regroup (text state and all)
        self.conversion = conversion
        # an expert-parallel plan: every rank all layers (no split), each its part's experts;
        # a mixed plan: its stages in the config (no split)
        self.kind = plan.kind
        self.split = conversion.split if self.kind == "pipeline" else None
        self.config = self._config_for(plan, replace(config, heartbeat_timeout_s=min(config.heartbeat_timeout_s, 2.5)))
        self.recoveries: list[dict] = []  # what happened, for tests and /metrics
        self._lock = threading.RLock()  # submits wait while the model moves
        self._fatal: str | None = None
        self._closed = False
        self.plan, self.placement = plan, ranks_on(plan, self.nodes)  # what runs now, per rank
        self._home = plan  # where each stage runs when every node is up
        self._placed_at = time.time()
        with self._lock:  # a failure hook waits until we are set up
            self._group = self._launcher(plan)  # the current group's launcher
            self._inner = open_engine(self.out_dir, self.config, ranks=len(self.placement),
                                      split=self.split, launcher=self._group,
                                      on_failure=self._on_failure)
        self._stop = threading.Event()
        if self.kind == "pipeline":  # expert parts and mixed ranks are not moved back to a returning node
            threading.Thread(target=self._take_back_loop, name="mlxdist-take-back",
                             daemon=True).start()
        self.model_name = config.model_name or model
        self.tokenizer = self._inner.tokenizer
        self.context_length = self._inner.context_length
        self.max_concurrent = self._inner.max_concurrent

    # -- placement and moving -------------------------------------------------------------
    def _shards(self, plan: Plan) -> list[list[tuple[Path, int]]]:
        """What each rank of `plan` runs from: [(directory to deliver, held as stage)]
        (`rank_shards`)."""
        return rank_shards(plan, self.conversion, self.out_dir)

    def _launcher(self, plan: Plan) -> ClusterLauncher:
        """Deliver each node the stages (or parts) `plan` gives it; the launcher for rank
        k on its node, from the (first) stage it runs."""
        placement, shards = ranks_on(plan, self.nodes), self._shards(plan)
        assignments: dict[str, list] = {}
        for v, held in zip(placement, shards):
            assignments.setdefault(v.node_id, []).extend((path, self.model, stage) for path, stage in held)
        deliver({v.node_id: v for v in placement}, assignments, self.cluster, self.secret)
        return ClusterLauncher([Placement(v, self.model, held[0][1]) for v, held in zip(placement, shards)],
                               self.cluster, self.secret)

    def _move(self, plan: Plan) -> None:
        """Run the model as `plan` says from now on; requests in flight are carried over
        (re-prefilled with their tokens so far; their text goes on where it stopped). An
        expert-parallel plan's ranks get their experts from it (the runtime then loads
        each rank's parts, its rows theirs concatenated)."""
        placement = ranks_on(plan, self.nodes)
        launcher = self._launcher(plan)
        self.config = self._config_for(plan, self.config)
        self._inner.regroup(ranks=len(placement), split=self.split, launcher=launcher, config=self.config)
        self._group, self.plan, self.placement = launcher, plan, placement

    def _config_for(self, plan: Plan, config: EngineConfig) -> EngineConfig:
        """`config` running `plan` (`config_for`): an expert-parallel plan's experts per
        rank, a mixed plan's stages."""
        return config_for(plan, config)

    def _replan(self, alive: Sequence[NodeView]) -> Plan:
        """The planner's placement on the nodes that answer, each stage (expert part) kept
        where it runs now if it fits there, KV caches for what the first plan counted."""
        first = Request(context=self._home.context, concurrency=self._home.concurrency)
        if self.kind == "expert-parallel":
            return self.conversion.parts_on(alive, first, self._part_nodes(self.plan))
        if self.kind == "mixed":
            return self.conversion.mixed_on(alive, first, self.plan)
        return self.conversion.plan_on(alive, first, {k: v.name for k, v in enumerate(self.placement)})

    def _part_nodes(self, plan: Plan) -> dict[int, str]:
        """Expert part -> the node an expert-parallel `plan` runs it on."""
        return {i: node for node, mine in zip(plan.group, self.conversion.parts_of(plan)) for i in mine}

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
        """The runtime's failure hook (its own thread): probe the nodes, plan again on
        the nodes left (the stages of the lost ones move) and carry every request over, or end
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
            before, before_plan, fatal = list(self.placement), self.plan, None
            if sum(r["reason"] != "nodes back" for r in self.recoveries) >= self.max_recoveries:
                fatal = f"{what}: {message} (gave up after {self.max_recoveries} re-placements)"
            elif self.kind != "pipeline" and not lost:  # every node answers: start the group again where it ran
                try:
                    self._move(self.plan)
                except Exception as e:
                    fatal = f"{what}: {message}; restart failed: {type(e).__name__}: {e}"
            else:
                try:
                    self._move(self._replan(alive))
                except UserError as e:
                    fatal = (experts_lost(self.plan.stages[0], lost, alive, message, str(e))
                             if self.kind == "expert-parallel"
                             else ranks_lost(self.plan, lost, alive, message, str(e)) if self.kind == "mixed"
                             else f"{what}: {message}; the model no longer fits on the nodes left: {e}")
                except Exception as e:
                    fatal = f"{what}: {message}; re-placement failed: {type(e).__name__}: {e}"
            self.recoveries.append({"reason": message, "lost": [v.name for v in lost],
                                    "noticed_at": noticed_at,
                                    "seconds": time.monotonic() - t0,
                                    "nodes": [v.name for v in alive], "fatal": fatal,
                                    "group": list(self.plan.group), "plan": self.plan.reason})
            if fatal:
                self._fatal = fatal
                log.error("%s", fatal)
                engine.fail(fatal)
                return
            change = (parts_moved(self.conversion.parts[0], self._part_nodes(before_plan),
                                  self._part_nodes(self.plan)) if self.kind == "expert-parallel"
                      else ranks_moved(before_plan, self.plan) if self.kind == "mixed"
                      else moved(before, self.placement))
            log.warning("%s; %s; now on %s (in %.1f s; first report: %s)", what, change,
                        [v.name for v in self.placement], time.monotonic() - t0, message)
            log.info("plan: %s", self.plan.reason)

    def _take_back_loop(self, interval_s: float = 2.0) -> None:
        """A node that comes back gets its stages back, at a moment with no request in
        flight (so nobody waits for the model to move)."""
        while not self._stop.wait(interval_s):
            if self._fatal or self._closed or self.plan.group == self._home.group or self._busy():
                continue
            up = {v.name for v in self._alive()}
            if any(name not in up for name in self._home.group):
                continue
            with self._lock:
                if self._fatal or self._closed or self.plan.group == self._home.group or self._busy():
                    continue
                self._take_back()

    def _busy(self) -> bool:
        return bool(self._inner.in_flight_state())

    def _take_back(self) -> None:
        t0, before = time.monotonic(), list(self.placement)
        home = ranks_on(self._home, self.nodes)
        held = {v.node_id for v in before}
        back = list({v.node_id: v for v in home if v.node_id not in held}.values())
        try:
            self._move(self._home)
        except Exception as e:  # stay on the nodes left; the next failure re-places again
            log.warning("could not move back to %s: %s", ", ".join(map(where, back)), e)
            try:
                self._move(self._replan(self._alive()))
            except Exception as e2:
                self._fatal = f"re-placement failed: {type(e2).__name__}: {e2}"
                log.error("%s", self._fatal)
                self._inner.fail(self._fatal)
            return
        self.recoveries.append({"reason": "nodes back", "back": names(back),
                                "noticed_at": time.time(), "seconds": time.monotonic() - t0,
                                "nodes": names(home), "fatal": None,
                                "group": list(self.plan.group), "plan": self.plan.reason})
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
        """The placement (the plan and why), node losses, re-placements and returns, with
        the inner engine's own (requests carried over), newest last."""
        out = [{"t": self._placed_at, "event": "placed",
                "message": f"stages on {', '.join(self._home.group)}: {self._home.reason}"}]
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
                            "message": f"re-placed in {r.get('seconds', 0):.1f} s: stages on "
                                       f"{', '.join(r.get('group') or [])}: {r.get('plan')}"})
        return sorted(out + self._inner.events(), key=lambda e: e["t"])[-50:]

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        with self._lock:
            self._inner.close()
