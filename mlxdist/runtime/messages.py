"""What the engine and rank 0's coordinator say to each other, as types, and the `Backend`
that carries them.

The engine sends commands (`Add`, `Cancel`, `Stop`) and receives events (`Token`, `End`);
a backend carries them to rank 0 and back: in this process (local.py) or over the sealed
control channel to a worker group (group.py). On the wire each is one msgpack map with a
string "t" (docs/runtime.md lists the fields); `to_wire` and `event_from_wire` convert at
the backend, so the engine never handles a dict and the coordinator reads exactly the
maps it always has.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Union


@dataclass(frozen=True)
class Sampling:
    """How rank 0 samples a request's tokens (its seed travels in `Add.seed`)."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 20


@dataclass(frozen=True)
class Think:
    """A chat answer's thinking as rank 0 follows it (thinking.py): the model's markers,
    whether the prompt left the answer inside the thinking, and what is left of the budget."""
    open: tuple[int, ...]
    close: tuple[int, ...]
    inside: bool
    budget: int | None


@dataclass(frozen=True)
class Add:
    """Start request `id`: prefill `prompt`, then decode up to `max_tokens`."""
    id: int
    prompt: tuple[int, ...]
    max_tokens: int
    seed: int
    logprobs: int
    stop_ids: tuple[int, ...]
    sampling: Sampling
    think: Think | None = None


@dataclass(frozen=True)
class Cancel:
    """Stop request `id` and free its slot (an `End` follows)."""
    id: int


@dataclass(frozen=True)
class Stop:
    """Shut rank 0 (and with it the group) down."""


@dataclass(frozen=True)
class Token:
    """One generated token of request `id`: its log-probability, the top alternatives when
    asked for, and whether it belongs to the thinking section."""
    id: int
    tok: int
    lp: float
    top: tuple[tuple[int, float], ...] = ()
    thinking: bool = False


@dataclass(frozen=True)
class End:
    """Rank 0 has freed request `id`; `stats` are its counters at that moment (/metrics)."""
    id: int
    stats: dict[str, float] | None = None


Command = Union[Add, Cancel, Stop]
Event = Union[Token, End]


class Backend(Protocol):
    """Where the engine's commands go and its events come from."""

    def start(self, on_event: Callable[[Event], None], on_failure: Callable[[str], None]) -> None: ...
    def send(self, cmd: Command) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def to_wire(cmd: Command) -> dict[str, Any]:
    """The map rank 0's coordinator reads (coordinator.py `_command`)."""
    if isinstance(cmd, Add):
        out = {"t": "add", "id": cmd.id, "prompt": list(cmd.prompt), "max_tokens": cmd.max_tokens,
               "seed": cmd.seed, "logprobs": cmd.logprobs, "stop_ids": list(cmd.stop_ids),
               "params": {**dataclasses.asdict(cmd.sampling), "seed": None}}
        if cmd.think is not None:
            t = cmd.think
            out["think"] = {"open": list(t.open), "close": list(t.close), "inside": t.inside, "budget": t.budget}
        return out
    if isinstance(cmd, Cancel):
        return {"t": "cancel", "id": cmd.id}
    if isinstance(cmd, Stop):
        return {"t": "stop"}
    raise TypeError(f"not a command: {cmd!r}")


def event_from_wire(msg: dict[str, Any]) -> Event | None:
    """The event a coordinator's map stands for; None for any other map."""
    t = msg.get("t")
    if t == "token":
        return Token(int(msg["id"]), int(msg["tok"]), float(msg["lp"]),
                     tuple((int(i), float(v)) for i, v in msg.get("top", ())), bool(msg.get("th")))
    if t == "end":
        return End(int(msg["id"]), msg.get("stats"))
    return None
