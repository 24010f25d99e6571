"""The order in which one stage runs new prompts (coordinator.py), on both kinds of device:

- where queueing computes (MLX's CPU backend: compute bound at any batch), prompts run one
  at a time in arrival order, and each request's first token comes from its group's next
  step, beside the tokens of the rows already decoding;
- elsewhere (a GPU), prompts that wait together run as one padded forward.

The coordinator is driven directly, with every request queued before it starts, so the
schedule is the same on a loaded machine. Tokens are checked against mlx-lm's
generate_step on each prompt alone (float32 tiny model)."""

from __future__ import annotations

import pytest
from runtime_helpers import reference_tokens, tiny_models  # noqa: F401

from mlxdist.runtime import coordinator
from mlxdist.runtime.messages import Add, Sampling, to_wire
from mlxdist.runtime.pipeline import StageRunner
from mlxdist.runtime.stage import StageSpec, load_stage

PROMPTS = [list(f"user {i}: {'hello there ' * (1 + i % 2)}what is it?".encode()) for i in range(5)]
MAX_TOKENS = [12, 6, 8, 7, 9]


def _run(path, layers: int) -> tuple[list[tuple[int, int]], dict[int, list[int]], dict]:
    """Every request queued at once, then the coordinator's loop in this thread (an MLX
    thread that ran a model must not end before the process) until all have ended.
    Returns the token events in order as (request, token), the tokens per request, and
    the coordinator's stats."""
    stage = load_stage(path, StageSpec(0, layers, layers))
    events: list[tuple[int, int]] = []
    ended: set[int] = set()
    coord = None

    def emit(msg: dict) -> None:
        if msg["t"] == "token":
            events.append((msg["id"], msg["tok"]))
        elif msg["t"] == "end":
            ended.add(msg["id"])
            if len(ended) == len(PROMPTS):
                coord.commands.put({"t": "stop"})

    coord = coordinator.Coordinator(StageRunner(stage), None, emit, max_slots=8)
    for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        coord.commands.put(to_wire(Add(id=i, prompt=tuple(p), max_tokens=n, seed=0, logprobs=0, stop_ids=(), sampling=Sampling())))
    coord.run()
    tokens = {i: [t for r, t in events if r == i] for i in range(len(PROMPTS))}
    return events, tokens, coord.stats


def _layers(path) -> int:
    import json

    return int(json.loads((path / "config.json").read_text())["num_hidden_layers"])


def test_prompts_one_at_a_time_where_queueing_computes(tiny_models, monkeypatch):
    monkeypatch.setattr(coordinator, "queue_computes", lambda: True)
    path = tiny_models["llama"]
    events, tokens, stats = _run(path, _layers(path))
    assert tokens == {i: reference_tokens(path, p, n) for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))}
    assert "prompts_together" not in stats
    # request i's first token comes in the step after its prompt, with request 0's
    # (i+1)-th: one prompt, then one step of every row, then the next prompt
    firsts = [next(k for k, (r, _) in enumerate(events) if r == i) for i in range(len(PROMPTS))]
    assert firsts == sorted(firsts)
    assert [sum(1 for r, _ in events[:f + 1] if r == 0) for f in firsts] == [1, 2, 3, 4, 5]


def test_prompts_batched_where_queueing_does_not_compute(tiny_models, monkeypatch):
    monkeypatch.setattr(coordinator, "queue_computes", lambda: False)
    path = tiny_models["llama"]
    events, tokens, stats = _run(path, _layers(path))
    assert tokens == {i: reference_tokens(path, p, n) for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))}
    assert stats["prompts_together"] == len(PROMPTS)  # one padded forward ran every prompt
    assert [r for r, _ in events[:len(PROMPTS)]] == list(range(len(PROMPTS)))  # their first step


@pytest.mark.parametrize("computes", [True, False])
def test_a_lone_request_alike_on_both(tiny_models, monkeypatch, computes):
    """Alone, the first token comes from a one-row group step (queue_computes) or from the
    last prompt token's own forward: the same tokens either way."""
    monkeypatch.setattr(coordinator, "queue_computes", lambda: computes)
    path = tiny_models["qwen3_moe"]
    stage = load_stage(path, StageSpec(0, _layers(path), _layers(path)))
    got: list[int] = []
    coord = None

    def emit(msg: dict) -> None:
        if msg["t"] == "token":
            got.append(msg["tok"])
        elif msg["t"] == "end":
            coord.commands.put({"t": "stop"})

    coord = coordinator.Coordinator(StageRunner(stage), None, emit, max_slots=2)
    coord.commands.put(to_wire(Add(id=0, prompt=tuple(PROMPTS[1]), max_tokens=10, seed=0, logprobs=0, stop_ids=(), sampling=Sampling())))
    coord.run()
    assert got == reference_tokens(path, PROMPTS[1], 10)
