"""Planner properties over random clusters and models (hypothesis), refusals, plan JSON."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mlxdist.errors import UserError
from mlxdist.placement.cost import kv_tokens
from mlxdist.placement.specs import GB, cluster_from_nodes, node_from_chip, parse_nodes
from mlxdist.placement.model import describe, load_model
from mlxdist.placement.plan import Plan
from mlxdist.placement.planner import Request, budget, plan
from tests.conftest import run_mlxdist

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def models(draw):
    """Random llama or deepseek_v3 configs, from small to DeepSeek-sized layer counts."""
    layers = draw(st.integers(2, 64))
    if draw(st.booleans()):
        heads = draw(st.sampled_from([8, 16, 32]))
        c = {"model_type": "llama", "hidden_size": heads * 128, "num_attention_heads": heads,
             "num_key_value_heads": draw(st.sampled_from([1, 2, 8])), "num_hidden_layers": layers,
             "intermediate_size": draw(st.sampled_from([2048, 8192, 14336])), "vocab_size": 32000,
             "tie_word_embeddings": draw(st.booleans())}
    else:
        experts = draw(st.sampled_from([8, 16, 64, 256]))
        c = {"model_type": "deepseek_v3", "hidden_size": 2048, "intermediate_size": 8192,
             "moe_intermediate_size": 1024, "num_hidden_layers": layers, "num_attention_heads": 16,
             "n_shared_experts": 1, "n_routed_experts": experts, "num_experts_per_tok": min(8, experts // 2),
             "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
             "qk_nope_head_dim": 128, "first_k_dense_replace": draw(st.integers(0, 3)) % layers,
             "vocab_size": 102400}
    return describe(c, bits=draw(st.sampled_from([3, 4, 8])))


chips = st.sampled_from(["M3 Ultra", "M2 Ultra", "M4 Pro", "M4 Max"])
memories = st.sampled_from([16, 24, 32, 48, 64, 96, 128, 192, 256, 512])


@st.composite
def clusters(draw, model=None):
    """Random clusters; sized against `model` half of the time, so that most plans need
    several nodes and some requests cannot fit."""
    n = draw(st.integers(1, 6))
    nodes = []
    for i in range(n):
        chip = draw(chips)
        if model is not None and draw(st.booleans()):
            gb = model.total_bytes / GB / n * draw(st.floats(0.3, 3.0)) + 8
        else:
            gb = draw(memories)
        nodes.append(node_from_chip(f"n{i}", chip, gb))
    return cluster_from_nodes(nodes, draw(st.sampled_from(["tb-tcp", "tb5-rdma"])))


def independent_memory(model, stage_layers, ep_owned, first, last, shared=True):
    """Bytes a node holds, summed straight from the layer table (not the planner's prefix
    sums). An expert-parallel member holds the shared experts only if it is the stage's
    first member (`shared`), which runs them for all; every member holds the embedding if
    the stage starts at layer 0 and the head if it ends at the last layer (whole-model EP:
    both; a mixed plan's expert-parallel stage: at most the head)."""
    a, b = stage_layers
    layers = model.layers[a:b]
    if ep_owned is None:
        w = sum(x.total_bytes for x in layers)
    else:
        w = sum(x.replicated_bytes - (0 if shared else x.shared_experts) + ep_owned * x.expert_bytes
                for x in layers)
    return w + (model.embedding if first else 0) + (model.head if last else 0)


@SETTINGS
@given(model=models(), data=st.data(), context=st.sampled_from([512, 4096, 32768]),
       concurrency=st.integers(1, 8))
def test_never_more_than_usable_memory(model, data, context, concurrency) -> None:
    cluster = data.draw(clusters(model))
    req = Request(context=context, concurrency=concurrency)
    try:
        p = plan(model, cluster, req)
    except UserError as e:
        assert "does not fit" in str(e) and "GB" in str(e)
        event("refused")
        return
    event(f"{p.strategy} over {len(p.group)} node(s)")
    covered = []
    for stage in p.stages:
        covered.extend(range(*stage.layers))
        for name in stage.nodes:
            node = cluster.node(name)
            owned = len(stage.experts_of(name)) if stage.expert_parallel else None
            # the head: on every rank of a whole-group EP stage, on a mixed plan's sampling member
            head = stage.layers[1] == model.num_layers and (p.strategy != "mixed" or name == stage.nodes[-1])
            w = independent_memory(model, stage.layers, owned, stage.layers[0] == 0, head,
                                   shared=name == stage.nodes[0])
            kv = sum(x.kv_bytes_per_token for x in model.layers[slice(*stage.layers)]) * kv_tokens(context) * concurrency
            assert w + kv <= budget(node, req.headroom) <= node.usable_bytes
            load = next(ld for ld in p.loads if ld.node == name)
            assert (load.weight_bytes, load.kv_bytes) == (w, kv)
    assert covered == list(range(model.num_layers))  # every layer exactly once, in order
    for stage in p.stages:
        if stage.expert_parallel:
            ids = sorted(i for _, e in stage.experts for i in e)
            assert ids == list(range(model.layers[-1].n_routed))  # every expert exactly once


@SETTINGS
@given(model=models(), n=st.integers(2, 6), chip=chips, slack=st.floats(1.0, 1.6), concurrency=st.integers(1, 8))
def test_identical_nodes_get_the_even_split(model, n, chip, slack, concurrency) -> None:
    need = model.total_bytes + model.kv_bytes_per_token * kv_tokens(2048) * concurrency
    memory = need / GB / n * slack / 0.95 + 4  # too small for n-1 nodes, mostly
    nodes = [node_from_chip(f"n{i}", chip, memory, reserve_gb=4) for i in range(n)]
    req = Request(context=2048, concurrency=concurrency, strategy="pipeline")
    try:
        p = plan(model, cluster_from_nodes(nodes), req)
    except UserError:
        event("refused")
        return
    counts = [s.layers[1] - s.layers[0] for s in p.stages]
    event(f"{len(counts)} stage(s)")
    # Memory repair may have to unbalance a split only when the even one overflows.
    even = [model.num_layers // len(counts) + (1 if i < model.num_layers % len(counts) else 0)
            for i in range(len(counts))]
    bounds = [sum(even[:i]) for i in range(len(even) + 1)]
    even_fits = all(
        independent_memory(model, (bounds[i], bounds[i + 1]), None, i == 0, i == len(even) - 1)
        + sum(x.kv_bytes_per_token for x in model.layers[bounds[i]:bounds[i + 1]]) * kv_tokens(2048) * concurrency
        <= budget(nodes[0], req.headroom) for i in range(len(even)))
    if even_fits:
        assert counts == even


def test_pipeline_on_mixed_nodes_gives_the_fast_node_more() -> None:
    nodes = [node_from_chip("ultra", "M3 Ultra", 256), node_from_chip("pro", "M4 Pro", 256)]
    p = plan(load_model("llama-3.1-405b"), cluster_from_nodes(nodes), Request(context=4096, concurrency=2))
    ultra, pro = (s.layers[1] - s.layers[0] for s in p.stages)
    assert ultra > 2 * pro  # 819 vs 273 GB/s


def test_expert_parallel_needs_low_latency_links() -> None:
    """Over TCP (0.3 ms a hop) 58 all_sums per token cost more than they save; over RDMA they pay."""
    two = [node_from_chip(f"u{i}", "M3 Ultra", 512) for i in range(2)]
    r1 = load_model("deepseek-r1")
    tcp = plan(r1, cluster_from_nodes(two, "tb-tcp"), Request(context=4096, concurrency=1))
    rdma = plan(r1, cluster_from_nodes(two, "tb5-rdma"), Request(context=4096, concurrency=1))
    assert tcp.strategy != "expert-parallel"
    assert rdma.strategy == "expert-parallel"
    assert rdma.estimate.decode_ms_per_token < tcp.estimate.decode_ms_per_token


def test_impossible_request_names_the_gap_and_the_fixes() -> None:
    minis = [node_from_chip(f"m{i}", "M4 Pro", 64) for i in range(8)]
    with pytest.raises(UserError) as e:
        plan(load_model("deepseek-r1"), cluster_from_nodes(minis), Request(context=65536, concurrency=8),
             describe_model=lambda b: load_model("deepseek-r1", bits=b))
    msg = str(e.value)
    assert "needs 414.4 GB" in msg and "425.6 GB usable" in msg
    assert "--bits 3" in msg and "--context 16384" in msg and "another M4 Pro node" in msg


def test_nodes_json_and_reserve() -> None:
    c = parse_nodes({"link": "tb5-rdma", "nodes": [
        {"name": "big", "chip": "M3 Ultra", "memory_gb": 512, "reserve_gb": 12},
        {"name": "x", "memory_gb": 32, "bandwidth_gbs": 120, "tflops": 4, "count": 2}]})
    assert [n.name for n in c.nodes] == ["big", "x-0", "x-1"]
    assert c.nodes[0].usable_bytes == 500 * GB and c.nodes[1].bandwidth == 120 * GB
    assert c.default_link == "tb5-rdma"
    with pytest.raises(UserError, match="unknown chip"):
        parse_nodes({"nodes": [{"chip": "M9", "memory_gb": 8}]})
    with pytest.raises(UserError, match="malformed"):
        parse_nodes({"nodes": [{"chip": "M4 Pro"}]})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=models(), data=st.data(), strategy=st.sampled_from(["auto", "pipeline", "expert-parallel", "mixed"]))
def test_plan_json_round_trips(model, data, strategy) -> None:
    """Plan.from_json is the exact inverse of to_json, through JSON text, for planner plans
    of every strategy (single, pipeline, expert-parallel, mixed)."""
    cluster = data.draw(clusters(model))
    try:
        p = plan(model, cluster, Request(context=4096, concurrency=2, strategy=strategy))
    except UserError:
        return
    event(p.strategy)
    doc = json.loads(json.dumps(p.to_json()))
    assert Plan.from_json(doc) == p
    assert Plan.from_json(doc).to_json() == doc


def test_bad_plan_documents_are_named(tmp_path) -> None:
    p = plan(describe({"model_type": "llama", "hidden_size": 1024, "num_attention_heads": 8,
                       "num_key_value_heads": 8, "num_hidden_layers": 4, "intermediate_size": 2048,
                       "vocab_size": 320}, bits=4),
             cluster_from_nodes([node_from_chip("a", "M4 Pro", 64), node_from_chip("b", "M4 Pro", 64)], "tb-tcp"),
             Request(context=512, concurrency=1, strategy="pipeline"))
    doc = json.loads(json.dumps(p.to_json()))
    bad = [({**doc, "format": 2}, "format is 2"),
           ({k: v for k, v in doc.items() if k != "group"}, "group is missing"),
           ({**doc, "stages": [{**doc["stages"][0], "layers": [0]}]}, r"stages\[0\].layers must be"),
           ({**doc, "stages": [{**doc["stages"][0], "nodes": ["zz"]}]}, r"stages\[0\].nodes must name"),
           ({**doc, "nodes": [{**doc["nodes"][0], "rank": 1}]}, r"nodes\[0\]: node 'a' is not rank 1"),
           ({**doc, "bits": "4"}, "bits must be an integer"),
           ([], "the document is not a JSON object")]
    for d, match in bad:
        with pytest.raises(ValueError, match=match):
            Plan.from_json(d)
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(doc))
    assert Plan.load(f) == p
    f.write_text("{")
    with pytest.raises(UserError, match="is not a plan from `mlxdist plan --json`"):
        Plan.load(f)
    with pytest.raises(UserError, match="not found"):
        Plan.load(tmp_path / "nope.json")


def test_cli_plan_json_schema(tmp_path) -> None:
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps({"nodes": [{"name": "mini", "chip": "M4 Pro", "memory_gb": 64, "count": 8}]}))
    r = run_mlxdist("plan", "deepseek-r1", "--nodes", str(nodes), "--json", "--strategy", "pipeline", timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["strategy"] == "pipeline" and doc["group"] == [f"mini-{i}" for i in range(8)]
    layers = [s["layers"] for s in doc["stages"]]
    assert layers[0][0] == 0 and layers[-1][1] == 61
    assert all(a[1] == b[0] for a, b in zip(layers, layers[1:]))
    assert all(len(s["nodes"]) == 1 and "experts" not in s for s in doc["stages"])
    assert {"decode_ms_per_token", "aggregate_tok_s", "prefill_tok_s"} <= set(doc["estimate"])
    r = run_mlxdist("plan", "deepseek-r1", "--nodes", str(nodes), "--context", "65536", "--concurrency", "8")
    assert r.returncode == 2 and r.stderr.startswith("mlxdist: error: ") and "Traceback" not in r.stderr


def test_cli_expert_parallel_json(tmp_path) -> None:
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps({"link": "tb5-rdma", "nodes": [
        {"name": "a", "chip": "M3 Ultra", "memory_gb": 512}, {"name": "b", "chip": "M3 Ultra", "memory_gb": 512}]}))
    r = run_mlxdist("plan", "deepseek-r1", "--nodes", str(nodes), "--json", "--strategy", "expert-parallel",
                    timeout=60)
    assert r.returncode == 0, r.stderr
    (stage,) = json.loads(r.stdout)["stages"]
    assert stage["layers"] == [0, 61] and stage["nodes"] == ["a", "b"]
    assert stage["experts"] == {"a": list(range(128)), "b": list(range(128, 256))}


def test_cli_mixed_json(tmp_path) -> None:
    """An M3 Ultra and two M4 Pros: `plan` (auto) picks the mixed plan, the M4 Pros one
    expert-parallel stage after the M3 Ultra's pipeline stage, each with half the experts."""
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps({"nodes": [{"name": "studio", "chip": "M3 Ultra", "memory_gb": 512},
                                           {"name": "mini", "chip": "M4 Pro", "memory_gb": 64, "count": 2}]}))
    r = run_mlxdist("plan", "deepseek-r1", "--nodes", str(nodes), "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["strategy"] == "mixed" and doc["group"] == ["studio", "mini-0", "mini-1"]
    first, ep = doc["stages"]
    assert first["nodes"] == ["studio"] and "experts" not in first and first["layers"][0] == 0
    assert ep["nodes"] == ["mini-0", "mini-1"] and ep["layers"] == [first["layers"][1], 61]
    assert ep["experts"] == {"mini-0": list(range(128)), "mini-1": list(range(128, 256))}
    assert [n["rank"] for n in doc["nodes"]] == [0, 1, 2]
    assert doc["reason"].startswith("mixed over 3 nodes, 2 stages, stage 1 (layers ")
    assert Plan.from_json(doc).to_json() == doc
    r = run_mlxdist("plan", "deepseek-r1", "--nodes", str(nodes), timeout=60)
    assert "strategy: mixed, stage 1 expert-parallel over mini-0+mini-1 (chained combine);" in r.stdout, r.stdout
