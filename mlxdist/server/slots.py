"""Admission: at most `slots` generations run in the engine; up to `queue_limit` more wait
for a slot in arrival order; beyond that the server answers 429 at once."""

from __future__ import annotations

import itertools
import threading
from typing import Callable


class QueueFull(Exception):
    pass


class Slots:
    def __init__(self, slots: int, queue_limit: int) -> None:
        self.slots, self.queue_limit = max(1, slots), max(0, queue_limit)
        self.active = 0
        self._waiting: list[int] = []  # tickets, oldest first
        self._tickets = itertools.count()
        self._cond = threading.Condition()

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._waiting)

    def acquire(self, n: int, gone: Callable[[], bool] = lambda: False, poll: float = 0.1) -> bool:
        """Take `n` slots, waiting in line; False if `gone()` turned true while waiting.
        Raises QueueFull when the line is already full."""
        n = min(n, self.slots)
        with self._cond:
            if not self._waiting and self.active + n <= self.slots:
                self.active += n
                return True
            if len(self._waiting) >= self.queue_limit:
                raise QueueFull
            ticket = next(self._tickets)
            self._waiting.append(ticket)
            try:
                while not (self._waiting[0] == ticket and self.active + n <= self.slots):
                    self._cond.wait(poll)
                    if gone():
                        return False
                self.active += n
                return True
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()

    def release(self, n: int) -> None:
        with self._cond:
            self.active -= min(n, self.slots)
            self._cond.notify_all()
