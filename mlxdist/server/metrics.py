"""Server counters and the Prometheus text the `/metrics` endpoint returns."""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from typing import Callable

RATE_WINDOW_S = 10.0


class Metrics:
    """Thread-safe counters. `tokens_per_second` is the aggregate output rate over the
    last few seconds, all requests together."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.cancelled = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens)

    def request_done(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def tokens(self, prompt: int = 0, completion: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            if completion:
                self._recent.append((time.monotonic(), completion))

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            self.ttft_count += 1

    def ttft_mean(self) -> float | None:
        with self._lock:
            return self.ttft_sum / self.ttft_count if self.ttft_count else None

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def tokens_per_second(self) -> float:
        with self._lock:
            cutoff = time.monotonic() - RATE_WINDOW_S
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S


def _metric_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key).strip("_").lower()


def render(m: Metrics, active: int, queued: int, slots: int, engine_stats: Callable[[], dict[str, float]]) -> str:
    lines = []

    def emit(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP mlxdist_{name} {help_}")
        lines.append(f"# TYPE mlxdist_{name} {kind}")
        for labels, value in samples:
            lines.append(f"mlxdist_{name}{labels} {value:g}" if isinstance(value, float) else f"mlxdist_{name}{labels} {value}")

    with m._lock:
        reqs = sorted(m.requests.items())
        prompt, completion, ttft_sum, ttft_count, cancelled = (
            m.prompt_tokens, m.completion_tokens, m.ttft_sum, m.ttft_count, m.cancelled)
    emit("requests_total", "counter", "HTTP requests answered, by endpoint and status.",
         [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in reqs] or [("", 0)])
    emit("prompt_tokens_total", "counter", "Prompt tokens processed.", [("", prompt)])
    emit("completion_tokens_total", "counter", "Tokens generated.", [("", completion)])
    emit("requests_cancelled_total", "counter", "Requests cancelled because the client went away.", [("", cancelled)])
    emit("active_requests", "gauge", "Generations running in the engine (slots in use).", [("", active)])
    emit("queued_requests", "gauge", "Generations waiting for a slot.", [("", queued)])
    emit("slots", "gauge", "Generations the engine runs at once.", [("", slots)])
    emit("time_to_first_token_seconds", "summary", "Time from request to first token.",
         [("_sum", float(ttft_sum)), ("_count", ttft_count)])
    emit("tokens_per_second", "gauge", f"Tokens generated per second, all requests, last {RATE_WINDOW_S:g} s.",
         [("", float(m.tokens_per_second()))])
    try:
        stats = engine_stats()
    except Exception:  # a failing engine must not take /metrics down
        stats = {}
    for key, value in sorted(stats.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            emit(f"engine_{_metric_name(key)}", "gauge", f"Engine statistic '{key}'.", [("", float(value))])
    return "\n".join(lines) + "\n"
