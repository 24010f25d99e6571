"""One API request's generations in the engine: submit them, merge their token events
into one asyncio stream, and cancel them all when the client goes away.

The engine's handles are blocking iterators; one small thread per handle (bounded by the
engine's slots, which admission holds before a Generation is made) moves their events
onto the event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Sequence

from mlxdist.runtime.api import Engine, GenerationRequest, RequestHandle, TokenEvent


class ClientGone(Exception):
    pass


_GONE = object()


class Generation:
    """Several requests (n choices, or several prompts) running at once. `events` yields
    (choice index, event) in arrival order; each choice's last event has a finish_reason.
    Made on the event loop's thread (`loop`)."""

    def __init__(self, engine: Engine, requests: Sequence[GenerationRequest], loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self.handles: list[RequestHandle] = []
        try:
            for r in requests:
                self.handles.append(engine.submit(r))
        except BaseException:
            self.cancel()
            raise
        for i, h in enumerate(self.handles):
            threading.Thread(target=self._pump, args=(i, h), daemon=True, name=f"pump-{h.request_id}").start()

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shut down): nobody listens
            pass

    def _pump(self, index: int, handle: RequestHandle) -> None:
        finished = False
        try:
            for event in handle:
                self._put((index, event))
                if event.finish_reason:
                    finished = True
                    break
        except Exception as e:  # the engine failed this request: report, do not crash
            self._put((index, TokenEvent(None, "", finish_reason="error", error=str(e) or type(e).__name__)))
            finished = True
        if not finished:
            self._put((index, TokenEvent(None, "", finish_reason="stop")))
        self._put((index, None))

    def client_gone(self) -> None:
        """The client went away (called on the loop): `events` cancels and raises ClientGone."""
        self._events.put_nowait(_GONE)

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        open_ = len(self.handles)
        while open_:
            item = await self._events.get()
            if item is _GONE:
                self.cancel()
                raise ClientGone
            index, event = item  # type: ignore[misc]
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
