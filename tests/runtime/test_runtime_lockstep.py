"""Lock-step decode runs (lockstep.py) over the ring group's all_sum, as real processes:
greedy tokens equal single-process mlx-lm, seeded sampling equal to one process, concurrent
requests equal to the same requests alone, and requests that arrive, stop or are cancelled
in the middle of a run (which ends the run and trims the caches) still exact. On CUDA the
same code sums over NCCL instead (tools/bench_gpu.py); CI has no GPU."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st
from runtime_helpers import drain_concurrently, reference_tokens, tiny_models  # noqa: F401 (fixture)

from mlxdist.runtime.api import GenerationRequest, SamplingParams
from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine
from mlxdist.runtime.lockstep import RunPlan

PROMPT = list(b"Pipelines keep every stage busy.")
SAMPLING = SamplingParams(temperature=0.8, top_k=40, repetition_penalty=1.1, seed=11)


@given(st.integers(2, 5), st.lists(st.integers(0, 15), min_size=1, max_size=9, unique=True))
def test_schedule_moves_each_pass_one_stage_per_tick(ranks, slots):
    """Independent of work_at's formula: simulate the pipeline tick by tick (each rank
    hands its work to the next; rank 0 starts the lanes' next passes in order) and compare."""
    plan = RunPlan.deal(slots, ranks)
    assert RunPlan.decode(plan.encode()) == plan
    assert sorted(s for lane in plan.lanes for s in lane) == sorted(slots)
    turn = [0] * len(plan.lanes)
    held: list[int | None] = [None] * ranks  # what each rank computes this tick
    for tick in range(6 * ranks * len(slots)):
        lane = tick % ranks
        if lane < len(plan.lanes):  # rank 0 starts this lane's next pass
            first = plan.lanes[lane][turn[lane] % len(plan.lanes[lane])]
            turn[lane] += 1
        else:
            first = None
        held = [first] + held[:-1]
        assert [plan.work_at(r, tick, ranks) for r in range(ranks)] == held
    if len(slots) >= ranks:  # a full pipeline: every rank busy once it has filled
        assert all(plan.work_at(r, t, ranks) is not None for r in range(ranks) for t in range(ranks, 3 * ranks))


def _runs(eng) -> int:
    """How many lock-step runs rank 0 made (its counters, as /metrics shows them)."""
    return int(eng.stats().get("runs", 0))


@pytest.mark.parametrize("arch,split", [("llama", [3, 3]), ("deepseek_v3", [1, 3, 2])])
def test_lockstep_matches_single_process(tiny_models, arch, split):
    path = tiny_models[arch]
    n_tok = 10
    ref = reference_tokens(path, PROMPT, n_tok)
    with open_engine(path) as one:
        seeded = one.submit(GenerationRequest(tuple(PROMPT), n_tok, SAMPLING)).tokens()
    config = EngineConfig(max_concurrent=4, handoff="collective")
    with open_engine(path, config, ranks=len(split), split=split) as eng:
        assert eng.generate(PROMPT, max_tokens=n_tok) == ref
        assert eng.generate(PROMPT, max_tokens=1) == ref[:1]
        assert eng.submit(GenerationRequest(tuple(PROMPT), n_tok, SAMPLING)).tokens() == seeded
        stop_at = ref[4]  # a stop id ends the run in its middle; the slot is freed cleanly
        events = list(eng.submit(GenerationRequest(tuple(PROMPT), n_tok, stop_token_ids=(stop_at,))))
        assert [e.token for e in events] == ref[:ref.index(stop_at) + 1]
        assert events[-1].finish_reason == "stop"
        # more requests than ranks, unequal lengths: lanes take turns, runs end and restart
        prompts = [PROMPT, PROMPT[:7], list(b"xyz"), list(b"a longer prompt than the others")]
        lengths = [n_tok, 3, n_tok, 6]
        alone = [eng.generate(p, max_tokens=m) for p, m in zip(prompts, lengths)]
        handles = [eng.submit(GenerationRequest(tuple(p), m)) for p, m in zip(prompts, lengths)]
        assert drain_concurrently(handles) == alone
        assert eng.failure is None
    assert _runs(eng) >= 5


def test_requests_joining_and_leaving_a_run(tiny_models):
    """A request that arrives while another is in a run ends that run (its prompt needs
    the message protocol); the first continues from trimmed caches, token-exact. A cancel
    in the middle of a run frees its slot for the next request."""
    path = tiny_models["llama"]
    n_tok = 24
    ref = reference_tokens(path, PROMPT, n_tok)
    other = list(b"another prompt")
    ref_other = reference_tokens(path, other, 8)
    with open_engine(path, EngineConfig(max_concurrent=2, handoff="collective"), ranks=2, split=[2, 4]) as eng:
        first = eng.submit(GenerationRequest(tuple(PROMPT), n_tok))
        got, joined = [], threading.Event()
        for ev in first:
            got.append(ev.token)
            if len(got) == 3:
                second = eng.submit(GenerationRequest(tuple(other), 8))
                joined.set()
        assert got == ref
        assert second.tokens() == ref_other
        # cancel in a run, then the same slots serve new requests exactly
        third = eng.submit(GenerationRequest(tuple(PROMPT), n_tok))
        it = iter(third)
        next(it), next(it)
        third.cancel()
        assert eng.generate(other, max_tokens=8) == ref_other
        assert eng.generate(PROMPT, max_tokens=n_tok) == ref
        assert eng.failure is None
    assert joined.is_set() and _runs(eng) >= 4


def test_lone_stream_runs_when_ranks_poll(tiny_models, monkeypatch):
    """With cores to spare (ranks poll the ring) a lone stream's steps would be chained
    over the messages; with a collective group it decodes in one run instead."""
    monkeypatch.setenv("MLXDIST_RING_SELECT", "0")
    path = tiny_models["llama"]
    ref = reference_tokens(path, PROMPT, 8)
    with open_engine(path, EngineConfig(handoff="collective"), ranks=2, split=[3, 3]) as eng:
        assert eng.generate(PROMPT, max_tokens=8) == ref
    assert _runs(eng) == 1


def test_top_logprobs_fall_back_to_messages(tiny_models):
    """Runs carry no top-logprob lists: such a request decodes over the messages, exactly."""
    from runtime_helpers import reference_top_logprobs

    path = tiny_models["llama"]
    ref = reference_top_logprobs(path, PROMPT, 4, 3)
    with open_engine(path, EngineConfig(handoff="collective"), ranks=2, split=[4, 2]) as eng:
        events = list(eng.submit(GenerationRequest(tuple(PROMPT), 4, logprobs=3)))
    assert [[i for i, _ in ev.top_logprobs] for ev in events] == [[i for i, _ in want] for want in ref]


def test_nccl_ranks_get_a_gpu_each():
    """`handoff="nccl"` with local ranks: rank r sees only the r-th usable GPU."""
    from mlxdist.errors import UserError
    from mlxdist.runtime.launcher import one_gpu_per_rank

    assert [one_gpu_per_rank(2, None)(r) for r in range(2)] == [{"CUDA_VISIBLE_DEVICES": "0"},
                                                                {"CUDA_VISIBLE_DEVICES": "1"}]
    assert [one_gpu_per_rank(2, "4, 6,7")(r)["CUDA_VISIBLE_DEVICES"] for r in range(2)] == ["4", "6"]
    with pytest.raises(UserError, match="2 ranks need a GPU each"):
        one_gpu_per_rank(2, "3")
