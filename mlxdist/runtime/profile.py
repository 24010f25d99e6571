"""Where a follower's time goes, one line per message or lock-step tick (MLXDIST_PROFILE)."""

from __future__ import annotations

import os
import time
from typing import Any

import mlx.core as mx

from mlxdist.runtime.ring_link import OP_RUN


class StepProfile:
    """With MLXDIST_PROFILE=DIR, a follower appends one line per message to DIR/rank<R>.tsv:
    op, tokens, seconds waiting for the header, seconds building and queueing the step,
    and, with MLXDIST_PROFILE_SYNC=1, seconds until its compute is done (that sync changes
    the timing it measures: it splits compute from waiting), then the start time."""

    def __init__(self, rank: int):
        d = os.environ.get("MLXDIST_PROFILE")
        self.sync = os.environ.get("MLXDIST_PROFILE_SYNC") == "1"
        self.file = open(os.path.join(d, f"rank{rank}.tsv"), "a", buffering=1) if d else None

    def row(self, op: int, n: int, t0: float, t1: float, outputs: Any) -> None:
        if self.file is None:
            return
        t2 = t3 = time.perf_counter()
        if self.sync:
            mx.eval(outputs)
            t3 = time.perf_counter()
        self.file.write(f"{op}\t{n}\t{t1 - t0:.6f}\t{t2 - t1:.6f}\t{t3 - t2:.6f}\t{t0:.6f}\n")

    def tick(self, n: int, build_s: float, wait_s: float, t0: float) -> None:
        """A lock-step tick (op RUN; n = 1 if this rank computed): the wait column is the
        time blocked reading a lagged control word, build the time to build and queue it."""
        if self.file is not None:
            self.file.write(f"{OP_RUN}\t{n}\t{wait_s:.6f}\t{build_s:.6f}\t0\t{t0:.6f}\n")
