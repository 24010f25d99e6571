"""The engine's expert-parallel stage (ep_stage.py): the whole model on every rank, the
routed experts divided, real ring ranks on 127.0.0.1. Greedy tokens equal single-process
mlx-lm's generate_step; concurrent requests equal the same requests alone; seeded sampling
equals one rank; a lost rank is reported and regroup carries the request over."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from runtime_helpers import ROOT, drain_concurrently, reference_tokens, run_cli, tiny_models, tokens_across_a_kill  # noqa: F401 (fixture)

from mlxdist.errors import UserError
from mlxdist.runtime.api import GenerationRequest, SamplingParams
from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine

PROMPT = list(b"Experts, divided.")
SAMPLING = SamplingParams(temperature=0.8, top_k=40, repetition_penalty=1.1, seed=5)
N_TOK = 8


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory) -> Path:
    """16 routed experts with random (not all-zero) gates, so that routing varies per token
    and every rank's experts are used; float32 (gather_mm on CPU takes float32 only)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from tiny_models import VOCAB, write_tokenizer

    from tests.placement.tiny import TINY_DEEPSEEK, make_tiny_deepseek

    path = make_tiny_deepseek(tmp_path_factory.mktemp("ep") / "deepseek",
                              config={**TINY_DEEPSEEK, "vocab_size": VOCAB})
    write_tokenizer(path)
    return path


def _sampled(path: Path) -> list[int]:
    with open_engine(path) as eng:
        return eng.submit(GenerationRequest(tuple(PROMPT), N_TOK, SAMPLING)).tokens()


@pytest.mark.parametrize("ranks", [2, 4])
def test_expert_parallel_matches_single_process(tiny_deepseek, ranks):
    ref = reference_tokens(tiny_deepseek, PROMPT, N_TOK)
    seeded = _sampled(tiny_deepseek)
    with open_engine(tiny_deepseek, EngineConfig(expert_parallel=True, max_concurrent=4), ranks=ranks) as eng:
        assert eng.generate(PROMPT, max_tokens=N_TOK) == ref
        assert eng.submit(GenerationRequest(tuple(PROMPT), N_TOK, SAMPLING)).tokens() == seeded
        prompts = [PROMPT, list(b"xyz")]
        alone = [eng.generate(p, max_tokens=N_TOK) for p in prompts]
        handles = [eng.submit(GenerationRequest(tuple(p), N_TOK)) for p in prompts]
        assert drain_concurrently(handles) == alone
        assert eng.failure is None
    assert all(code == 0 for code in eng._backend.launcher.poll().values())


def test_top_logprobs_match_one_rank(tiny_deepseek):
    with open_engine(tiny_deepseek) as eng:
        want = list(eng.submit(GenerationRequest(tuple(PROMPT), 4, logprobs=3)))
    with open_engine(tiny_deepseek, EngineConfig(expert_parallel=True), ranks=2) as eng:
        got = list(eng.submit(GenerationRequest(tuple(PROMPT), 4, logprobs=3)))
    assert [e.token for e in got] == [e.token for e in want]
    for g, w in zip(got, want):
        assert [i for i, _ in g.top_logprobs] == [i for i, _ in w.top_logprobs]
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(g.top_logprobs, w.top_logprobs))


def test_expert_parallel_qwen3_moe_and_chunked_prefill(tiny_models, tiny_deepseek):
    path = tiny_models["qwen3_moe"]
    with open_engine(path, EngineConfig(expert_parallel=True), ranks=2) as eng:
        assert eng.generate(PROMPT, max_tokens=N_TOK) == reference_tokens(path, PROMPT, N_TOK)
    with open_engine(tiny_deepseek, EngineConfig(expert_parallel=True, prefill_step=5), ranks=2) as eng:
        assert eng.generate(PROMPT, max_tokens=4) == reference_tokens(tiny_deepseek, PROMPT, 4, prefill_step=5)


def test_each_rank_holds_only_its_experts(tiny_deepseek):
    """What load_stage keeps with the expert-parallel hook: the owned experts' rows only,
    the shared experts on the shared rank (rank 0 of a one-process group here)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxdist.runtime.ep_stage import keep_own_experts
    from mlxdist.runtime.stage import StageSpec, load_stage

    group = mx.distributed.init()
    full = load_stage(tiny_deepseek, StageSpec(0, 4, 4))
    part = load_stage(tiny_deepseek, StageSpec(0, 4, 4),
                      prepare=lambda m: keep_own_experts(m.model, group, owned=[3, 4, 5, 6]))

    def switch_bytes(stage) -> int:
        return sum(v.nbytes for k, v in tree_flatten(stage.model.parameters()) if "switch_mlp" in k)

    for layer in part.model.model.layers[1:]:
        assert layer.mlp.switch_mlp.gate_proj.weight.shape[0] == 4
        assert layer.mlp.shared_experts is not None
    assert switch_bytes(part) * 4 == switch_bytes(full)  # 4 of 16 experts


def test_refusals(tiny_models, tiny_deepseek):
    with pytest.raises(UserError, match="needs an MoE model"):
        open_engine(tiny_models["llama"], EngineConfig(expert_parallel=True), ranks=2)
    with pytest.raises(UserError, match="only 4 routed experts"):
        open_engine(tiny_models["qwen3_moe"], EngineConfig(expert_parallel=True), ranks=5)
    with pytest.raises(UserError, match="--split is for pipeline"):
        open_engine(tiny_deepseek, EngineConfig(expert_parallel=True), ranks=2, split=[2, 2])


def test_lost_rank_regroups_and_finishes(tiny_deepseek):
    """A follower SIGKILLed mid-generation: the failure hook regroups onto 2 expert-parallel
    ranks, the request is re-prefilled and ends with the uninterrupted run's tokens."""
    ref = reference_tokens(tiny_deepseek, PROMPT, 100)
    eng = open_engine(tiny_deepseek, EngineConfig(expert_parallel=True, heartbeat_timeout_s=3.0), ranks=3,
                      on_failure=lambda e, msg: e.regroup(ranks=2))
    try:
        assert tokens_across_a_kill(eng, 2, PROMPT, 100, before=3) == ref
        assert len(eng._backend.hosts) == 2 and eng.failure is None
    finally:
        eng.close()


def test_run_cli_expert_parallel(tiny_deepseek):
    with open_engine(tiny_deepseek) as eng:
        tokens = eng.generate(eng.encode_chat([{"role": "user", "content": "hi"}]), max_tokens=6)
        expected = eng.tokenizer.decode(tokens)
    r = run_cli("run", str(tiny_deepseek), "--ranks", "2", "--expert-parallel", "-p", "hi", "--max-tokens", "6")
    assert (r.returncode, r.stdout.rstrip("\n")) == (0, expected), r.stderr


def test_uneven_experts_from_a_plan(tiny_deepseek):
    """The planner's own expert-parallel plan for two unequal nodes (more experts on the
    faster one) runs token-exact through the engine."""
    import json

    from mlxdist.placement import NodeSpec, place
    from mlxdist.placement.plan import Plan
    from mlxdist.runtime.ep_stage import experts_from_plan

    GB = 1 << 30
    nodes = [NodeSpec("big", 64 * GB, 800e9, 1e14, 0), NodeSpec("small", 64 * GB, 200e9, 1e14, 0)]
    plan = Plan.from_json(json.loads(json.dumps(place(str(tiny_deepseek), nodes, context=256, concurrency=1,
                                                      strategy="expert-parallel").to_json())))
    experts = experts_from_plan(plan)
    assert len(experts) == 2 and len(experts[0]) != len(experts[1])
    with open_engine(tiny_deepseek, EngineConfig(expert_parallel=True, experts=experts), ranks=2) as eng:
        assert eng.generate(PROMPT, max_tokens=N_TOK) == reference_tokens(tiny_deepseek, PROMPT, N_TOK)
    with pytest.raises(UserError, match="every expert 0..15 to exactly one rank"):
        open_engine(tiny_deepseek, EngineConfig(expert_parallel=True, experts=[[0, 1], [2]]), ranks=2)


def test_openai_server_over_expert_parallel(tiny_deepseek):
    """The server stack is unchanged on top: a chat completion through the OpenAI client
    gives the same text as the engine on one rank."""
    import openai

    from mlxdist.server.app import ApiServer

    messages = [{"role": "user", "content": "hi"}]
    with open_engine(tiny_deepseek) as eng:
        expected = eng.tokenizer.decode(eng.generate(eng.encode_chat(messages), max_tokens=6))
    eng = open_engine(tiny_deepseek, EngineConfig(expert_parallel=True), ranks=2)
    server = ApiServer(eng, "127.0.0.1", 0, quiet=True).start()
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        r = c.chat.completions.create(model=eng.model_name, messages=messages, max_tokens=6, temperature=0)
        assert r.choices[0].message.content == expected
    finally:
        server.shutdown()
        eng.close()


def test_engine_loads_the_parts_of_an_expert_parallel_conversion(tmp_path):
    """`mlxdist quantize --plan` with an expert-parallel plan: each rank loads its node's
    part (its routed experts only, checked against the manifest) and the engine's greedy
    tokens equal mlx-lm's on the same conversion in one stage."""
    import json

    import make_checkpoint

    from mlxdist.placement import NodeSpec, place
    from quantize.convert import convert

    ckpt = make_checkpoint.deepseek(tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    GB = 1 << 30
    nodes = [NodeSpec("big", 64 * GB, 800e9, 1e14, 0), NodeSpec("small", 64 * GB, 400e9, 1e14, 0)]
    plan = place(str(ckpt), nodes, context=256, concurrency=1, strategy="expert-parallel")
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_json()))
    parts = convert(ckpt, tmp_path / "parts", plan=tmp_path / "plan.json", progress=False)
    whole = convert(ckpt, tmp_path / "whole", stages=1, progress=False)
    with open_engine(parts, EngineConfig(expert_parallel=True), ranks=2) as eng:
        assert eng.generate(PROMPT, max_tokens=N_TOK) == reference_tokens(whole, PROMPT, N_TOK)
