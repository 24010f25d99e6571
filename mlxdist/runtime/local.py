"""ranks=1: the whole model as one stage, its loop in a thread of this process.

MLX streams belong to the thread that made them, and a model holds lazily computed
constants besides its parameters (e.g. rotary frequencies), so one thread both loads the
stage and runs it; `__init__` waits for the load and re-raises its errors."""

from __future__ import annotations

import threading
from typing import Any, Callable

from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.coordinator import Coordinator
from mlxdist.runtime.messages import Command, Event, Stop, event_from_wire, to_wire
from mlxdist.runtime.pipeline import StageRunner
from mlxdist.runtime.source import ModelSource
from mlxdist.runtime.stage import LoadedStage, StageSpec, load_stage


class InProcessBackend:
    def __init__(self, source: ModelSource, config: EngineConfig):
        (self.plan,) = source.stages
        self.source, self.config = source, config
        self.coord: Coordinator | None = None
        self._loaded = threading.Event()
        self._started = threading.Event()
        self._coord_ready = threading.Event()
        self._stopped = threading.Event()
        self._load_error: BaseException | None = None
        self._callbacks: tuple[Callable[[dict], None], Callable[[str], None]] | None = None
        self.thread = threading.Thread(target=self._body, name="mlxdist-coordinator", daemon=True)
        self.thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def _load(self) -> LoadedStage:
        from mlxdist.runtime.shards import verify_stage

        if self.plan.shard:
            verify_stage(self.source.root, self.plan)
        return load_stage(self.plan.model_dir, StageSpec(self.plan.start, self.plan.end, self.plan.num_layers),
                          presanitized=self.plan.shard)

    def _body(self) -> None:
        try:
            self._serve()
        finally:
            # MLX 0.32 aborts the process at exit ("terminate called without an active
            # exception") once a thread that ran a model with KV caches has ended; a thread
            # that never ends is harmless. So the daemon thread stays, idle, after its work.
            self._stopped.set()
            threading.Event().wait()

    def _serve(self) -> None:
        try:
            stage = self._load()
        except BaseException as e:
            self._load_error = e
            self._loaded.set()
            return
        self._loaded.set()
        self._started.wait()
        if self._callbacks is None:  # closed before it was started
            return
        on_event, on_failure = self._callbacks

        def emit(msg: dict) -> None:  # the coordinator's maps, as the engine's typed events
            if (ev := event_from_wire(msg)) is not None:
                on_event(ev)

        self.coord = Coordinator(StageRunner(stage), None, emit,
                                 max_slots=self.config.max_concurrent, prefill_step=self.config.prefill_step,
                                 prompt_cache=self.config.prompt_cache)
        self._coord_ready.set()
        try:
            self.coord.run()
        except BaseException as e:  # reported to every request
            on_failure(f"generation failed: {type(e).__name__}: {e}")

    def start(self, on_event: Callable[[Event], None], on_failure: Callable[[str], None]) -> None:
        self._callbacks = (on_event, on_failure)
        self._started.set()
        self._coord_ready.wait()

    def send(self, cmd: Command) -> None:
        assert self.coord is not None
        self.coord.commands.put(to_wire(cmd))

    def stats(self) -> dict[str, Any]:
        return {"ranks": 1, **(self.coord.stats if self.coord else {})}

    def close(self) -> None:
        if self.coord is not None:
            self.coord.commands.put(to_wire(Stop()))
            self._stopped.wait(timeout=30)
        else:
            self._started.set()
