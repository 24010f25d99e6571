"""What the rest of mlxdist (server, chat, cluster) sees of the runtime.

The runtime builds an `Engine`; the server and the chat REPL only use this interface, so
they work the same over one process, N local ranks or a cluster of Macs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

from mlxdist.errors import UserError

# How decode steps pass between pipeline ranks (open_engine's `handoff`, runtime/lockstep.py)
HANDOFFS = ["messages", "collective", "nccl"]
HANDOFF_HELP = ("How decode steps pass between ranks: ring messages; lock-step runs of all_sum over "
                "the ring group (collective; not on CUDA); or the same over NCCL (nccl: CUDA GPUs, one per "
                "local rank).")


def check_handoff(handoff: str, nodes: bool = False, expert_parallel: bool = False) -> None:
    if handoff == "nccl" and nodes:
        raise UserError("--handoff nccl runs with --local N (one GPU per rank on this host); "
                        "cluster nodes take messages or collective")
    if handoff != "messages" and expert_parallel:
        raise UserError("--handoff is for pipeline stages; --expert-parallel has its own collectives")
    if not nodes and (problem := handoff_problem(handoff)):
        raise UserError(problem)


def handoff_problem(handoff: str) -> str | None:
    """Why `handoff` cannot run with this machine's MLX, or None. The workers check the
    same (worker.py); the CLI asks first so that nothing loads for nothing."""
    if handoff not in ("nccl", "collective"):
        return None
    import mlx.core as mx

    if handoff == "nccl" and not mx.cuda.is_available():
        return ("--handoff nccl needs MLX's CUDA build and one NVIDIA GPU per rank; "
                "on Macs and CPUs use messages (the default)")
    if handoff == "collective" and mx.cuda.is_available():
        # over the ring group each tick's all_sum would cross CPU<->GPU events, which the
        # runs exist to avoid, and a lone stream on one shared H100 did not finish its run
        # in minutes (docs/performance.md): refused rather than risk a hang
        return ("--handoff collective is refused on CUDA GPUs (its all_sum would cross "
                "CPU<->GPU events every step): use --handoff nccl")
    return None


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1 means off
    repetition_context: int = 20
    seed: int | None = None


@dataclass(frozen=True)
class Thinking:
    """A chat request's thinking section, as token ids: `open` starts it (the model writes
    it first, unless `inside`: the prompt opened it already) and `close` ends it. With a
    `budget`, once that many tokens of thinking are written the engine writes `close`
    itself and the answer follows (runtime/thinking.py); None: no limit."""

    open: tuple[int, ...]
    close: tuple[int, ...]
    inside: bool = False
    budget: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    prompt_tokens: tuple[int, ...]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # in addition to the tokenizer's EOS tokens
    logprobs: int = 0  # top-k logprobs wanted per token; 0 = none
    thinking: Thinking | None = None  # follow (and budget) the thinking section


@dataclass(frozen=True)
class TokenEvent:
    """One step of a request's output. `text` is the newly decodable text (may be empty
    while a multi-byte character is incomplete). The last event has `finish_reason` set:
    "stop" (EOS or stop string), "length" (max_tokens), "cancelled" or "error"."""

    token: int | None
    text: str
    logprob: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    # the request's `logprobs` most likely tokens at this step, as (token, logprob), most
    # likely first; empty when not asked for
    top_logprobs: tuple[tuple[int, float], ...] = ()
    thinking: bool = False  # the token belongs to the thinking section (request.thinking given)


@dataclass(frozen=True)
class Health:
    """What `GET /health` reports: "ok"; "degraded" while the engine rebuilds its ranks
    (requests wait, then continue); "down" when it cannot serve. `reason` says why."""

    status: str
    reason: str = ""


@dataclass(frozen=True)
class StageInfo:
    """One rank's part of the model, as `GET /v1/cluster` shows it: layers [start, end)
    on node `node`; for a rank of an expert-parallel stage, the routed experts it owns."""

    rank: int
    node: str
    start: int
    end: int
    weight_bytes: int = 0
    experts: tuple[int, ...] | None = None
    total_experts: int = 0


@dataclass(frozen=True)
class NodeInfo:
    """A machine that runs ranks. Memory in bytes (None: unknown); links as (to, kind),
    kind one of thunderbolt, ethernet, wifi, loopback, unknown."""

    name: str
    host: str
    chip: str = ""
    health: str = "ok"
    memory_total: int | None = None
    memory_free: int | None = None
    links: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Layout:
    """Where the model runs: `mode` is "process" (one process), "local" (ranks on this
    machine) or "nodes" (cluster nodes)."""

    mode: str
    num_layers: int
    stages: tuple[StageInfo, ...]
    nodes: tuple[NodeInfo, ...]


def engine_layout(engine: object) -> Layout:
    """An engine's layout; one without `layout()` is one process of unknown shape."""
    probe = getattr(engine, "layout", None)
    if callable(probe):
        return probe()
    return Layout("process", 0, (), ())


def engine_events(engine: object) -> list[dict]:
    """What happened to an engine's ranks (restarts, node losses), newest last."""
    probe = getattr(engine, "events", None)
    return list(probe()) if callable(probe) else []


def engine_health(engine: object) -> Health:
    """An engine's health; one without `health()` is judged by its `failure`."""
    probe = getattr(engine, "health", None)
    if callable(probe):
        return probe()
    failure = getattr(engine, "failure", None)
    return Health("down", str(failure)) if failure else Health("ok")


class RequestHandle(Protocol):
    request_id: int

    def __iter__(self) -> Iterator[TokenEvent]: ...

    def cancel(self) -> None: ...


class Engine(Protocol):
    """A loaded model ready to generate. Thread-safe: `submit` may be called from many
    threads; requests run concurrently (pipelined across stages)."""

    model_name: str
    tokenizer: object  # mlx_lm.tokenizer_utils.TokenizerWrapper
    context_length: int
    max_concurrent: int

    def submit(self, request: GenerationRequest) -> RequestHandle: ...

    def stats(self) -> dict[str, float]: ...

    def health(self) -> Health: ...

    def layout(self) -> Layout: ...

    def events(self) -> list[dict]: ...

    def close(self) -> None: ...

    def encode_chat(self, messages: Sequence[dict]) -> list[int]: ...
