"""`EngineConfig`: every engine option, each with its one default, as one frozen value.

It travels whole: `open_engine(path, config)` keeps it, `make_backend` hands it to the
ranks, and each worker gets it inside its `WorkerSpec` (launcher.py), one msgpack blob on
its stdin, also through a cluster node's launch order. Adding an option is a field here
and its use where it matters; nothing in between names it.

Fields are checked on construction (`__post_init__`) against their type and the bounds in
their metadata, so `from_msgpack` of a bad blob raises a ValueError naming the field.
Callables and objects (a launcher, a failure hook) are not configuration: they are
keyword arguments of `open_engine`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import msgpack

from mlxdist.runtime.api import HANDOFFS

BACKENDS = ("ring", "jaccl", "mpi")


def _bounds(lo: float, hi: float) -> dict[str, Any]:
    return {"bounds": (lo, hi)}


@dataclass(frozen=True)
class StageLayout:
    """One pipeline stage of a mixed plan (docs/placement.md "Mixed plans"): layers
    [start, end) on `ranks` consecutive ranks. With more than one rank the stage is
    expert-parallel over them: each holds the attention and every dense part, and
    `experts[i]` are the routed experts of its i-th rank (empty: an even split)."""

    start: int = field(metadata=_bounds(0, 1 << 20))
    end: int = field(metadata=_bounds(1, 1 << 20))
    ranks: int = field(default=1, metadata=_bounds(1, 1024))
    experts: tuple[tuple[int, ...], ...] = field(default=(), metadata=_bounds(0, 1 << 20))

    def __post_init__(self) -> None:
        check_fields(self)  # types and bounds, then the shape
        if self.start >= self.end:
            raise ValueError(f"StageLayout: [{self.start}, {self.end}) is not a layer range")
        if self.experts and len(self.experts) != self.ranks:
            raise ValueError(f"StageLayout.experts: {len(self.experts)} ranks' experts for a stage of {self.ranks}")


@dataclass(frozen=True)
class EngineConfig:
    max_concurrent: int = field(default=8, metadata=_bounds(1, 1024))  # requests decoded together (slots)
    prefill_step: int = field(default=2048, metadata=_bounds(1, 1 << 20))  # prompt tokens per prefill chunk
    # finished requests whose caches stay on every rank for a prompt that starts the same way; 0: off
    prompt_cache: int = field(default=0, metadata=_bounds(0, 1024))
    backend: str = field(default="ring", metadata={"choices": BACKENDS})  # mx.distributed backend of the ranks
    # decode hand-offs: ring messages, or lock-step all_sum runs over the ring group or NCCL (lockstep.py)
    handoff: str = field(default="messages", metadata={"choices": tuple(HANDOFFS)})
    expert_parallel: bool = False  # one stage: every rank all layers and 1/N of the routed experts
    # with expert_parallel: each rank's expert ids (e.g. ep_stage.experts_from_plan); (): an even split
    experts: tuple[tuple[int, ...], ...] = field(default=(), metadata=_bounds(0, 1 << 20))
    # a mixed plan: the pipeline's stages in rank order, one of them expert-parallel over some
    # ranks (not rank 0's); (): one rank per stage (open_engine's split). mixed.py: from a Plan
    stages: tuple[StageLayout, ...] = ()
    heartbeat_timeout_s: float = field(default=5.0, metadata=_bounds(0.1, 3600))  # a silent rank fails the group
    startup_timeout_s: float = field(default=300.0, metadata=_bounds(1, 86400))  # every rank ready by then
    # restart a failed group here, requests carried over (GroupEngine._heal); None: where the ranks are
    # local (no launcher) and no on_failure hook is given
    restart: bool | None = None
    restart_limit: int = field(default=5, metadata=_bounds(0, 1000))  # restarts within 10 minutes: a crash loop
    in_process: bool = True  # ranks=1 without a launcher: the stage in a thread of this process
    model_name: str = field(default="", metadata={"max_len": 256})  # the API's model name; "": the directory's

    def __post_init__(self) -> None:
        check_fields(self)
        if self.stages and (self.expert_parallel or self.handoff != "messages"):
            raise ValueError("EngineConfig.stages: a mixed plan runs with handoff 'messages' (no lock-step "
                             "runs) and without expert_parallel (its stages say which is)")

    def to_msgpack(self) -> bytes:
        return pack(self)

    @classmethod
    def from_msgpack(cls, blob: bytes) -> "EngineConfig":
        return unpack(cls, blob)


def pack(obj: Any) -> bytes:
    """A checked dataclass as one msgpack map (nested dataclasses as maps)."""
    return msgpack.packb(dataclasses.asdict(obj), use_bin_type=True)


def unpack(cls: type, blob: bytes) -> Any:
    """The `cls` that `pack` made `blob` from; ValueError naming what is wrong."""
    try:
        data = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types on garbage
        raise ValueError(f"not a msgpack map: {type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ValueError("not a msgpack map")
    return from_dict(cls, data)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """`cls(**data)`, refusing unknown and missing fields by name; nested dataclass fields
    are parsed the same way. Types and bounds are cls's own checks."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    unknown = sorted(set(data) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field {unknown[0]!r}")
    missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{cls.__name__}: missing field {missing[0]!r}")
    values = dict(data)
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _nested(cls, name, hint, value)
        elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{cls.__name__}.{name}: want a list")
            values[name] = tuple(_nested(cls, name, typing.get_args(hint)[0], v) for v in value)
    return cls(**values)


def _nested(cls: type, name: str, hint: type, value: Any) -> Any:
    """A nested dataclass field's value from its map."""
    if not isinstance(value, dict):
        raise ValueError(f"{cls.__name__}.{name}: want a map")
    return from_dict(hint, value)


def check_fields(obj: Any) -> None:
    """Normalize (lists to tuples, ints to floats) and check every field of a frozen
    dataclass against its type hint and metadata (bounds, choices, max_len)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        where = f"{type(obj).__name__}.{f.name}"
        value = _coerce(getattr(obj, f.name), hints[f.name], where)
        _check_meta(value, f.metadata, where)
        object.__setattr__(obj, f.name, value)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ValueError:
                pass
        raise ValueError(f"{where}: {value!r} is not {hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: want a list, got {type(value).__name__}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if hint is type(None):
        if value is not None:
            raise ValueError(f"{where}: want None")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise ValueError(f"{where}: want a {hint.__name__}")
        return value
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{where}: want {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_meta(value: Any, meta: Any, where: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(meta['choices'])}")
    if "max_len" in meta and len(value) > meta["max_len"]:
        raise ValueError(f"{where}: longer than {meta['max_len']} characters")
    if "bounds" in meta:
        lo, hi = meta["bounds"]
        for x in _numbers(value):
            if not lo <= x <= hi:
                raise ValueError(f"{where}: {x} is not within {lo}..{hi}")


def _numbers(value: Any) -> list:
    if isinstance(value, tuple):
        return [x for v in value for x in _numbers(v)]
    return [] if value is None else [value]
