"""Admission: at most `slots` generations run in the engine; up to `queue_limit` more wait
for a slot in arrival order; beyond that the server answers 429 at once. Used from the
server's event loop only (no locks)."""

from __future__ import annotations

import asyncio
from collections import deque


class QueueFull(Exception):
    pass


class Slots:
    def __init__(self, slots: int, queue_limit: int) -> None:
        self.slots, self.queue_limit = max(1, slots), max(0, queue_limit)
        self.active = 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()  # oldest first

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def acquire(self, n: int, gone: asyncio.Event | None = None) -> bool:
        """Take `n` slots, waiting in line; False if `gone` was set while waiting.
        Raises QueueFull when the line is already full."""
        n = min(n, self.slots)
        if not self._waiting and self.active + n <= self.slots:
            self.active += n
            return True
        if len(self._waiting) >= self.queue_limit:
            raise QueueFull
        entry = (n, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        watch = [asyncio.ensure_future(gone.wait())] if gone is not None else []
        try:
            await asyncio.wait([entry[1], *watch], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._abandon(entry)
            raise
        finally:
            for w in watch:
                w.cancel()
        if entry[1].done() and not entry[1].cancelled():
            return True
        self._abandon(entry)
        return False

    def _abandon(self, entry: tuple[int, asyncio.Future]) -> None:
        n, fut = entry
        if fut.done() and not fut.cancelled():  # granted meanwhile: give the slots back
            self.release(n)
            return
        fut.cancel()
        try:
            self._waiting.remove(entry)
        except ValueError:
            pass
        self._grant()

    def release(self, n: int) -> None:
        self.active -= min(n, self.slots)
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self.active + self._waiting[0][0] <= self.slots:
            n, fut = self._waiting.popleft()
            if fut.cancelled():
                continue
            self.active += n
            fut.set_result(True)
