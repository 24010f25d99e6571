"""ranks=1: the whole model as one stage, its loop in a thread of this process."""

from __future__ import annotations

from typing import Any, Callable

from mlxdist.runtime.pipeline import Coordinator, StageRunner, run_coordinator_thread
from mlxdist.runtime.source import ModelSource
from mlxdist.runtime.stage import StageSpec, load_stage


class InProcessBackend:
    def __init__(self, source: ModelSource, max_concurrent: int, prefill_step: int):
        (plan,) = source.stages
        from mlxdist.runtime.shards import verify_stage

        if plan.shard:
            verify_stage(source.root, plan)
        self.stage = load_stage(plan.model_dir, StageSpec(plan.start, plan.end, plan.num_layers),
                                presanitized=plan.shard)
        self.max_concurrent, self.prefill_step = max_concurrent, prefill_step
        self.coord: Coordinator | None = None

    def start(self, on_event: Callable[[dict], None], on_failure: Callable[[str], None]) -> None:
        self.coord = Coordinator(StageRunner(self.stage), None, on_event,
                                 max_slots=self.max_concurrent, prefill_step=self.prefill_step)
        self.thread = run_coordinator_thread(
            self.coord, lambda e: on_failure(f"generation failed: {type(e).__name__}: {e}"))

    def send(self, cmd: dict) -> None:
        assert self.coord is not None
        self.coord.commands.put(cmd)

    def stats(self) -> dict[str, Any]:
        return {"ranks": 1, **(self.coord.stats if self.coord else {})}

    def close(self) -> None:
        if self.coord is not None:
            self.coord.commands.put({"t": "stop"})
            self.thread.join(timeout=30)
