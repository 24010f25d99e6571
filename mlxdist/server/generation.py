"""One API request's generations in the engine: submit them, merge their token events
into one stream, and cancel them all when the client goes away."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Sequence

from mlxdist.runtime.api import Engine, GenerationRequest, RequestHandle, TokenEvent


class ClientGone(Exception):
    pass


class Generation:
    """Several requests (n choices, or several prompts) running at once. `events` yields
    (choice index, event) in arrival order; each choice's last event has a finish_reason."""

    def __init__(self, engine: Engine, requests: Sequence[GenerationRequest]) -> None:
        self._events: queue.Queue[tuple[int, TokenEvent | None]] = queue.Queue()
        self.handles: list[RequestHandle] = []
        try:
            for r in requests:
                self.handles.append(engine.submit(r))
        except BaseException:
            self.cancel()
            raise
        for i, h in enumerate(self.handles):
            threading.Thread(target=self._pump, args=(i, h), daemon=True, name=f"pump-{h.request_id}").start()

    def _pump(self, index: int, handle: RequestHandle) -> None:
        finished = False
        try:
            for event in handle:
                self._events.put((index, event))
                if event.finish_reason:
                    finished = True
                    break
        except Exception as e:  # the engine failed this request: report, do not crash
            self._events.put((index, TokenEvent(None, "", finish_reason="error", error=str(e) or type(e).__name__)))
            finished = True
        if not finished:
            self._events.put((index, TokenEvent(None, "", finish_reason="stop")))
        self._events.put((index, None))

    def events(self, gone: Callable[[], bool], poll: float = 0.1) -> Iterator[tuple[int, TokenEvent]]:
        open_ = len(self.handles)
        while open_:
            try:
                index, event = self._events.get(timeout=poll)
            except queue.Empty:
                if gone():
                    self.cancel()
                    raise ClientGone
                continue
            if event is None:
                open_ -= 1
                continue
            yield index, event

    def cancel(self) -> None:
        for h in self.handles:
            try:
                h.cancel()
            except Exception:
                pass
