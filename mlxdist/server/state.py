"""What every endpoint shares: the engine (and verifier), admission slots, metrics, the
thread pool for slow work, and the limits on what one client may hold."""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from starlette.requests import Request

from mlxdist.runtime.api import Engine, Thinking
from mlxdist.server import protocol
from mlxdist.server.metrics import Metrics
from mlxdist.server.protocol import ApiError
from mlxdist.server.reasoning import think_markers
from mlxdist.server.slots import Slots

MAX_BODY = 4 << 20


@dataclass(frozen=True)
class HttpLimits:
    """What one client may hold, and for how long."""

    max_connections: int = 4096  # open sockets; one more gets a 503 and is closed
    header_timeout_s: float = 10.0  # a connection with no complete request headers by then is closed
    body_timeout_s: float = 30.0  # a request body that has not all arrived by then: 408
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    write_timeout_s: float = 60.0  # a client that reads nothing for this long is dropped
    max_body: int = MAX_BODY  # bytes; larger: 413
    body_readers: int = 16  # request bodies read at once (bounds their memory)
    workers: int = 4  # threads for parsing, tokenizing and submitting


class Api:
    """The state every endpoint shares."""

    def __init__(self, engine: Engine, api_key: str | None, max_queue: int, limits: HttpLimits,
                 quiet: bool, verifier: Engine | None = None, efforts: dict[str, int] | None = None) -> None:
        self.engine, self.api_key, self.limits, self.quiet = engine, api_key, limits, quiet
        self.verifier = verifier  # the model that scores answers for search (None: the engine itself)
        self.efforts = dict(efforts or protocol.EFFORT_BUDGETS)  # reasoning_effort -> thinking tokens
        self._markers: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self.slots = Slots(engine.max_concurrent, max_queue)
        self.metrics = Metrics()
        self.started = time.time()
        self.pool = ThreadPoolExecutor(limits.workers, thread_name_prefix="api-work")
        self.body_gate: asyncio.Semaphore | None = None  # made on the loop
        self.cluster_streams = 0
        self.vocab = _vocab_size(engine)
        self.max_token_chars = _max_token_chars(engine)

    def thinking(self, budget: int | None, starts_inside: bool) -> Thinking | None:
        """What the engine follows of a chat answer's thinking: the model's markers (found
        on first use), where the prompt left it, and the budget. None when the tokenizer
        has no closing marker; a budget then cannot be enforced: 400."""
        if self._markers is None:
            self._markers = think_markers(self.engine.tokenizer)
        opening, closing = self._markers
        if not closing:
            if budget is not None:
                raise ApiError(400, "this model's tokenizer has no end-of-thinking marker: a thinking budget "
                               "cannot be enforced", param="thinking_budget")
            return None
        return Thinking(opening, closing, starts_inside, budget)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in the work pool. Once the server is shutting down (the pool is shut
        down), a request still at work ends with a 503 instead of a traceback."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except RuntimeError as e:
            if "after shutdown" not in str(e):
                raise
            raise ApiError(503, "the server is shutting down") from None

    def log(self, request: Request, status: int, t0: float) -> None:
        if self.quiet:
            return
        client = f"{request.client.host}:{request.client.port}" if request.client else "-"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        sys.stderr.write(f"{stamp}Z {client} \"{request.method} {request.url.path}\" {status} "
                         f"{time.monotonic() - t0:.3f}s\n")


def _vocab_size(engine: Engine) -> int:
    try:
        return int(len(engine.tokenizer.vocab) if hasattr(engine.tokenizer, "vocab") else 0)
    except Exception:
        return 0


def _max_token_chars(engine: Engine) -> int:
    """The longest token's text, in characters (0: unknown)."""
    try:
        vocab = engine.tokenizer.vocab
        return max((len(t) for t in vocab), default=0) if isinstance(vocab, dict) else 0
    except Exception:
        return 0
