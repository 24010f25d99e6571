"""Mixed plans served by the engine (runtime/mixed.py): pipeline stages plus one stage that
is expert-parallel over some of the ring's ranks, its MoE layers combined by chained sums
over neighbour links, real worker processes on 127.0.0.1.

References are independent: greedy tokens against mlx-lm's generate_step on the prompt
alone in one process (same prefill chunks), a seeded request against the same request on
one in-process rank, the experts held against the unsliced stage's arrays."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from runtime_helpers import ROOT, drain_concurrently, reference_tokens, run_cli, tokens_across_a_kill

from mlxdist.errors import UserError
from mlxdist.placement.plan import Estimate, Plan, Stage
from mlxdist.runtime.api import GenerationRequest, SamplingParams
from mlxdist.runtime.config import EngineConfig, StageLayout
from mlxdist.runtime.engine import open_engine
from mlxdist.runtime.launcher import LocalLauncher
from mlxdist.runtime.mixed import layout_from_plan, plan_run
from mlxdist.runtime.source import resolve_source

PREFILL = 8  # the third prompt runs in chunks
PROMPTS = [list(b"Experts, divided."), list(b"xyz"), list(b"a longer prompt, cut in chunks of eight"),
           list(b"mixed plan")]
LENGTHS = [10, 5, 8, 12]
SAMPLING = SamplingParams(temperature=0.8, top_k=40, repetition_penalty=1.1, seed=5)
# rank 1 gets 10 experts, rank 2 six, neither a contiguous range
RANK1 = (0, 2, 4, 6, 8, 10, 12, 14, 1, 3)
RANK2 = (5, 7, 9, 11, 13, 15)


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory) -> Path:
    """4 layers (0 dense, 1-3 MoE), 16 routed experts with random gates, float32."""
    sys.path.insert(0, str(ROOT / "tools"))
    from tiny_models import VOCAB, write_tokenizer

    from tests.placement.tiny import TINY_DEEPSEEK, make_tiny_deepseek

    path = make_tiny_deepseek(tmp_path_factory.mktemp("mixed") / "deepseek",
                              config={**TINY_DEEPSEEK, "vocab_size": VOCAB})
    write_tokenizer(path)
    return path


def make_plan(stages: list[tuple[tuple[int, int], dict[str, tuple[int, ...]]]]) -> Plan:
    """A plan as `mlxdist plan --json` writes it (through its JSON), stage by stage: layers
    and {node: experts} (one node with () for a pipeline stage)."""
    group = tuple(n for _, nodes in stages for n in nodes)
    strategy = "mixed" if any(len(nodes) > 1 for _, nodes in stages) else "pipeline"
    plan = Plan("tiny", "deepseek_v3", 32, 256, 4, strategy, group,
                tuple(Stage(layers, tuple(nodes), tuple(nodes.items()) if len(nodes) > 1 else ())
                      for layers, nodes in stages),
                (), Estimate(1.0, 1.0, 1000.0, 100.0, 0.0), "hand-written", "tb")
    return Plan.from_json(json.loads(json.dumps(plan.to_json())))


def member_lines(log_dir: Path, ranks: range) -> dict[int, dict]:
    """What each member says it holds (mixed.describe), from its log."""
    out = {}
    for r in ranks:
        text = (log_dir / f"rank{r}.log").read_text()
        m = re.search(r"experts (\[[\d, ]+\]), routed rows per MoE layer (\[[\d, ]+\]), routed bytes (\d+), "
                      r"([a-z ]+), resident bytes (\d+)", text)
        assert m, text
        out[r] = {"experts": json.loads(m[1]), "rows": json.loads(m[2]), "bytes": int(m[3]), "role": m[4],
                  "resident": int(m[5])}
    return out


def routed_bytes_of(path: Path, start: int, end: int) -> int:
    """The routed experts' bytes of the unsliced layers [start, end), loaded here."""
    from mlxdist.runtime.mixed import routed_bytes
    from mlxdist.runtime.stage import StageSpec, load_stage

    return routed_bytes(load_stage(path, StageSpec(start, end, 4)))


def test_expert_parallel_last_stage_matches_mlx_lm(tiny_deepseek, tmp_path):
    """Rank 0 layers [0, 2), ranks 1-2 expert-parallel over [2, 4) (the last stage: rank 2
    samples). Four greedy requests at once (decoded as batched rows, one prompt in chunks)
    equal mlx-lm's; a seeded request among them equals itself on one rank; a request after
    the group went idle (parked) still does; each member holds only its experts."""
    refs = [reference_tokens(tiny_deepseek, p, n, prefill_step=PREFILL) for p, n in zip(PROMPTS, LENGTHS)]
    with open_engine(tiny_deepseek) as one:
        seeded = one.submit(GenerationRequest(tuple(PROMPTS[0]), 8, SAMPLING)).tokens()
    run = plan_run(make_plan([((0, 2), {"a": ()}), ((2, 4), {"b": RANK1, "c": RANK2})]),
                   EngineConfig(max_concurrent=4, prefill_step=PREFILL))
    assert (run.ranks, run.split) == (3, None)
    assert run.config.stages == (StageLayout(0, 2), StageLayout(2, 4, 2, (RANK1, RANK2)))
    logs = tmp_path / "logs"
    with open_engine(tiny_deepseek, run.config, ranks=run.ranks, launcher=LocalLauncher(log_dir=str(logs))) as eng:
        handles = [eng.submit(GenerationRequest(tuple(p), n)) for p, n in zip(PROMPTS, LENGTHS)]
        handles.append(eng.submit(GenerationRequest(tuple(PROMPTS[0]), 8, SAMPLING)))
        got = drain_concurrently(handles)
        assert got[:4] == refs
        assert got[4] == seeded
        stats = eng.stats()
        assert stats["widest"] >= 2 and stats["prefill_chunks"] >= 2, stats  # batched rows, a chunked prompt
        assert eng.generate(PROMPTS[3], max_tokens=LENGTHS[3]) == refs[3]
        assert [s.experts for s in eng.layout().stages] == [None, RANK1, RANK2]
        assert eng.failure is None
    held = member_lines(logs, range(1, 3))
    assert [held[r]["experts"] for r in (1, 2)] == [list(RANK1), list(RANK2)]
    assert held[1]["rows"] == [10, 10] and held[2]["rows"] == [6, 6]  # layers 2 and 3, MoE both
    full = routed_bytes_of(tiny_deepseek, 2, 4)
    assert held[1]["bytes"] == full * 10 // 16 and held[2]["bytes"] == full * 6 // 16
    assert (held[1]["role"], held[2]["role"]) == ("relays to the next member", "samples")


def test_expert_parallel_middle_stage_matches_mlx_lm(tiny_deepseek, tmp_path):
    """4 ranks: rank 0 layer 0, ranks 1-2 expert-parallel over [1, 3) (an even split),
    rank 3 layer 3: the stage's last member sends the hidden state on to a pipeline stage.
    Five requests at once over the three stages' groups."""
    prompts, lengths = PROMPTS + [list(b"fifth")], LENGTHS + [7]
    refs = [reference_tokens(tiny_deepseek, p, n, prefill_step=PREFILL) for p, n in zip(prompts, lengths)]
    config = EngineConfig(max_concurrent=5, prefill_step=PREFILL,
                          stages=(StageLayout(0, 1), StageLayout(1, 3, 2), StageLayout(3, 4)))
    logs = tmp_path / "logs"
    with open_engine(tiny_deepseek, config, ranks=4, launcher=LocalLauncher(log_dir=str(logs))) as eng:
        handles = [eng.submit(GenerationRequest(tuple(p), n)) for p, n in zip(prompts, lengths)]
        assert drain_concurrently(handles) == refs
        assert eng.stats()["widest"] >= 2
    held = member_lines(logs, range(1, 3))
    assert [held[r]["experts"] for r in (1, 2)] == [list(range(8)), list(range(8, 16))]
    assert held[1]["rows"] == held[2]["rows"] == [8, 8]
    assert (held[1]["role"], held[2]["role"]) == ("relays to the next member", "sends on")


def test_a_killed_member_restarts_with_the_same_plan(tiny_deepseek):
    """The relaying member SIGKILLed mid-answer: the engine restarts the ranks with the
    same stages (they travel in its config) and the request ends with the uninterrupted
    run's tokens."""
    ref = reference_tokens(tiny_deepseek, PROMPTS[0], 60)
    config = EngineConfig(stages=(StageLayout(0, 2), StageLayout(2, 4, 2, (RANK1, RANK2))))
    with open_engine(tiny_deepseek, config, ranks=3) as eng:
        assert tokens_across_a_kill(eng, 1, PROMPTS[0], 60, before=3) == ref
        assert {"restarting", "requests_healed", "restarted"} <= {e["event"] for e in eng.events()}
        assert [s.experts for s in eng.layout().stages] == [None, RANK1, RANK2]


def test_per_node_parts_of_a_mixed_conversion(tmp_path):
    """`mlxdist quantize --plan` with a mixed plan writes per-node parts for its
    expert-parallel stage; each member loads its node's part (only its experts, checked
    against the manifest), and the greedy tokens equal mlx-lm's on the same weights
    converted as one stage."""
    import make_checkpoint

    from quantize.convert import convert

    ckpt = make_checkpoint.deepseek(tmp_path / "ckpt")  # 5 layers: 0-2 dense, 3-4 MoE; 8 experts
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    plan = make_plan([((0, 3), {"a": ()}), ((3, 5), {"b": (0, 2, 4, 6, 7), "c": (1, 3, 5)})])
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_json()))
    parts = convert(ckpt, tmp_path / "parts", plan=tmp_path / "plan.json", progress=False)
    whole = convert(ckpt, tmp_path / "whole", stages=1, progress=False)
    run = plan_run(Plan.load(tmp_path / "plan.json"), EngineConfig())
    source = resolve_source(parts, run.ranks, stages=run.config.stages)
    assert [p.model_dir.relative_to(parts).as_posix() for p in source.stages] == [
        "stages/0", "stages/1/nodes/b", "stages/1/nodes/c"]
    logs = tmp_path / "logs"
    with open_engine(parts, run.config, ranks=run.ranks, launcher=LocalLauncher(log_dir=str(logs))) as eng:
        assert eng.generate(PROMPTS[0], max_tokens=8) == reference_tokens(whole, PROMPTS[0], 8)
    held = member_lines(logs, range(1, 3))
    assert held[1]["rows"] == [5, 5] and held[2]["rows"] == [3, 3]
    # each member's resident weights (summed over its loaded arrays) are what the planner
    # counts for it within 2%: shared experts on the first member, the head on the last
    from mlxdist.placement.cost import Profile
    from mlxdist.placement.model import load_model

    profile = Profile(load_model(str(ckpt)))
    for r, t, owned in ((1, 0, 5), (2, 1, 3)):
        planned = profile.member_weights(3, 5, owned, shared=t == 0, head=t == 1)
        assert abs(held[r]["resident"] / planned - 1) < 0.02, (r, held[r]["resident"], planned)


def test_run_cli_with_a_mixed_plan(tiny_deepseek, tmp_path):
    """`mlxdist run MODEL --plan mixed.json`: one local rank per node, the same answer as
    one rank."""
    plan = make_plan([((0, 2), {"a": ()}), ((2, 4), {"b": RANK1, "c": RANK2})])
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_json()))
    with open_engine(tiny_deepseek) as eng:
        expected = eng.tokenizer.decode(eng.generate(eng.encode_chat([{"role": "user", "content": "hi"}]),
                                                     max_tokens=6))
    r = run_cli("run", str(tiny_deepseek), "--plan", str(tmp_path / "plan.json"), "-p", "hi", "--max-tokens", "6",
                "--stats")
    assert (r.returncode, r.stdout.rstrip("\n")) == (0, expected), r.stderr
    assert r.stderr.rstrip().endswith("3 ranks]"), r.stderr
    for extra, said in [(["--ranks", "2"], "the plan runs on 3 nodes"), (["--split", "2,2"], "no --split"),
                        (["--handoff", "collective"], "--handoff messages")]:
        r = run_cli("run", str(tiny_deepseek), "--plan", str(tmp_path / "plan.json"), "-p", "hi", *extra)
        assert r.returncode != 0 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_refusals(tiny_deepseek, tiny_llama):
    """Shapes the runtime cannot serve are refused in one line, before any rank starts."""
    two = (StageLayout(0, 2), StageLayout(2, 4, 2))
    with pytest.raises(UserError, match="must come after the first stage"):
        resolve_source(tiny_deepseek, 3, stages=(StageLayout(0, 2, 2), StageLayout(2, 4)))
    with pytest.raises(UserError, match="one expert-parallel stage"):
        resolve_source(tiny_deepseek, 5, stages=(StageLayout(0, 1), StageLayout(1, 2, 2), StageLayout(2, 4, 2)))
    with pytest.raises(UserError, match="run on 3 ranks, not 4"):
        resolve_source(tiny_deepseek, 4, stages=two)
    with pytest.raises(UserError, match="contiguous ranges from 0"):
        resolve_source(tiny_deepseek, 3, stages=(StageLayout(0, 2), StageLayout(2, 3, 2)))
    with pytest.raises(UserError, match="every expert 0..15 to exactly one rank"):
        resolve_source(tiny_deepseek, 3, stages=(StageLayout(0, 2), StageLayout(2, 4, 2, ((0, 1), (2,)))))
    with pytest.raises(UserError, match="needs an MoE model"):
        resolve_source(tiny_llama, 3, stages=(StageLayout(0, 3), StageLayout(3, 6, 2)))
    with pytest.raises(UserError, match="no --split or --expert-parallel"):
        resolve_source(tiny_deepseek, 3, split=[2, 2], stages=two)
    with pytest.raises(ValueError, match="EngineConfig.stages"):
        EngineConfig(stages=two, handoff="collective")
    with pytest.raises(UserError, match="one expert-parallel stage over some of the nodes"):
        layout_from_plan(make_plan([((0, 2), {"a": ()}), ((2, 4), {"b": ()})]))
    source = resolve_source(tiny_deepseek, 3, stages=two)
    assert source.experts == ((), tuple(range(8)), tuple(range(8, 16)))
    assert [(p.rank, p.start, p.end) for p in source.stages] == [(0, 0, 2), (1, 2, 4), (2, 2, 4)]
    assert EngineConfig.from_msgpack(EngineConfig(stages=two).to_msgpack()).stages == two


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    from tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("mixed") / "llama", "llama", layers=6)
