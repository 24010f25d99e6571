"""One API request's generations in the engine: submit them, merge their token events
into one asyncio stream, and cancel them all when the client goes away.

The engine's handles are blocking iterators; one small thread per handle (bounded by the
engine's slots, which admission holds before a Generation is made) moves their events
onto the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Sequence

from mlxdist.runtime.api import Engine, GenerationRequest, RequestHandle, TokenEvent
from mlxdist.server.protocol import ApiError
from mlxdist.server.slots import QueueFull, Slots

Run = Callable[..., Awaitable[Any]]  # runs a blocking function off the event loop


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


def decode(engine: Engine, tokens: Sequence[int]) -> str:
    """The text of `tokens` ("" when the tokenizer cannot say)."""
    try:
        return engine.tokenizer.decode(list(tokens))  # type: ignore[attr-defined]
    except Exception:
        return ""


async def start_generation(engine: Engine, requests: Sequence[GenerationRequest], loop: asyncio.AbstractEventLoop,
                           run: Run | None = None) -> Generation:
    """Submit `requests` off the event loop. Cancelled while submitting, the requests are
    cancelled as soon as the submission returns (never left running unowned)."""
    run = run or (lambda fn, *args: loop.run_in_executor(None, fn, *args))
    pending = asyncio.ensure_future(run(Generation, engine, requests, loop))
    try:
        return await asyncio.shield(pending)
    except asyncio.CancelledError:
        pending.add_done_callback(lambda f: f.result().cancel() if not f.cancelled() and f.exception() is None
                                  else None)
        raise


async def run_waves(start: Callable[[list[GenerationRequest]], Awaitable[Generation]],
                    requests: Sequence[GenerationRequest], limit: int,
                    on_event: Callable[[int, TokenEvent], None]) -> None:
    """Run `requests` at most `limit` at a time (a wave starts when the one before is done),
    calling on_event(index in requests, event) for each event; whatever ends it (on_event
    raising included), every request started is cancelled."""
    step = max(1, limit)
    for first in range(0, len(requests), step):
        gen = await start(list(requests[first:first + step]))
        try:
            async for k, event in gen.events():
                on_event(first + k, event)
        finally:
            gen.cancel()


async def chat_tokens(run: Run, engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    """The chat template applied to `messages` (off the loop); a template that refuses them: 400."""
    try:
        return list(await run(engine.encode_chat, messages))
    except Exception as e:
        raise ApiError(400, f"the model's chat template refused these messages: {e}", param="messages")


async def admit(slots: Slots, n: int, gone: asyncio.Event) -> bool:
    """`n` slots, waiting in line; False if the client left first, 429 if the line is full."""
    try:
        return await slots.acquire(n, gone)
    except QueueFull:
        raise ApiError(429, "the server is busy: too many requests waiting; try again shortly",
                       type="rate_limit_error", code="rate_limit_exceeded")


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """The engine's refusals as HTTP errors: a request it refuses (400), an engine that is
    closed or whose ranks failed for good (503)."""
    try:
        yield
    except ValueError as e:
        raise ApiError(400, str(e))
    except RuntimeError as e:
        raise ApiError(503, f"the model is not available: {e}", type="server_error", code="engine_unavailable")


async def watch_disconnect(receive: Callable[[], Awaitable[dict]], on_gone: Callable[[], None]) -> None:
    """After the body, the next ASGI message is the client's disconnect (or the end of
    our response, which uvicorn reports the same way: harmless once we are done)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_gone()
            return
