"""`mlxdist quantize --plan` with an expert-parallel plan writes one part per node holding
only that node's routed experts (docs/shard-format.md): each part's headers hold its
experts' rows only, byte-equal to the unsliced conversion's rows; the manifest's sha256s
match the files; two ring ranks loading the parts generate mlx-lm's greedy tokens of the
unsliced model; each rank's resident weight bytes are the plan's `weight_bytes`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from quantize_helpers import ROOT, make_checkpoint

from mlxdist.errors import UserError
from mlxdist.placement import NodeSpec, place
from mlxdist.shard_format import Manifest, StageJson, read_safetensors_header
from quantize.convert import convert

PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 119]
MAX_TOKENS = 8
WORKER = str(ROOT / "tests" / "placement" / "ep_worker.py")
GB = 1 << 30


@pytest.fixture(scope="module")
def ep(tmp_path_factory):
    """A DeepSeek checkpoint (8 routed experts), its expert-parallel plan over two unequal
    nodes, the conversion cut by that plan, and the same conversion in one stage. Floats
    are float32 (config.json's torch_dtype), so the CPU backend runs what mlx-lm runs and
    the planner counts the bytes the conversion writes."""
    d = tmp_path_factory.mktemp("ep-parts")
    ckpt = make_checkpoint.deepseek(d / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    nodes = [NodeSpec("big", 64 * GB, 800e9, 1e14, 0), NodeSpec("small", 64 * GB, 400e9, 1e14, 0)]
    plan = place(str(ckpt), nodes, context=256, concurrency=1, strategy="expert-parallel")
    (d / "plan.json").write_text(json.dumps(plan.to_json()))
    out = convert(ckpt, d / "out", plan=d / "plan.json", progress=False)
    whole = convert(ckpt, d / "whole", stages=1, progress=False)
    return plan, out, whole, d / "plan.json"


def ckpt_of(out: Path) -> Path:
    return Path(Manifest.load(out).source.path)


def _bytes(path: Path, t) -> bytes:
    with open(path, "rb") as f:
        f.seek(t.start)
        return f.read(t.nbytes)


def test_each_part_holds_only_its_experts(ep):
    plan, out, whole, _ = ep
    (stage,) = Manifest.load(out).stages
    assert [(p.node, p.experts) for p in stage.parts] == [(n, ids) for n, ids in plan.stages[0].experts]
    assert len(stage.parts[0].experts) != len(stage.parts[1].experts)  # the faster node holds more
    full_file = whole / "stages" / "0" / "weights.safetensors"
    full = read_safetensors_header(full_file)
    for part in stage.parts:
        assert StageJson.load(out / part.dir) == StageJson(0, 1, (0, 5), True, True, part.node, part.experts)
        path = out / part.dir / "weights.safetensors"
        head = read_safetensors_header(path)
        assert set(head) == set(full)
        for name, t in head.items():
            if ".switch_mlp." not in name:
                assert t.shape == full[name].shape and _bytes(path, t) == _bytes(full_file, full[name]), name
                continue
            assert t.shape == (len(part.experts), *full[name].shape[1:]), name
            row = full[name].nbytes // full[name].shape[0]
            whole_rows = _bytes(full_file, full[name])
            assert _bytes(path, t) == b"".join(whole_rows[e * row:(e + 1) * row] for e in part.experts), name
    assert not list(out.glob("model-*.safetensors")) and not (out / "model.safetensors.index.json").exists()


def test_manifest_sha256s_match_the_files(ep):
    from mlxdist.cluster.shards import stage_sources
    from mlxdist.runtime.shards import verify_stage
    from mlxdist.runtime.source import resolve_source

    _, out, _, plan_file = ep
    manifest = Manifest.load(out)
    assert manifest.options["parts"] == [[[p.node, list(p.experts)] for p in manifest.stages[0].parts]]
    for part in manifest.stages[0].parts:
        path = out / part.dir / "weights.safetensors"
        assert part.files == (f"{part.dir}/weights.safetensors",) and part.nbytes == path.stat().st_size
        head = read_safetensors_header(path)
        assert set(part.tensors) == set(head)
        for name, t in part.tensors.items():
            assert (t.shape, t.dtype, t.nbytes) == (head[name].shape, head[name].dtype, head[name].nbytes)
            assert t.sha256 == hashlib.sha256(_bytes(path, head[name])).hexdigest(), name
    assert manifest.stage_bytes(out) == [sum(p.stat().st_size for p in (out / "stages" / "0").rglob("*")
                                             if p.is_file())]
    for part in manifest.stages[0].parts:  # what a node gets delivered: the part and the manifest
        assert stage_sources(out / part.dir)["manifest.json"] == out / "manifest.json"
    source = resolve_source(out, 2, expert_parallel=True)
    assert [p.model_dir for p in source.stages] == [out / p.dir for p in manifest.stages[0].parts]
    for p in source.stages:
        verify_stage(out, p)
    assert convert(ckpt_of(out), out, plan=plan_file, progress=False) == out  # the same conversion: done


def test_two_ranks_from_parts_equal_mlx_lm_and_hold_the_planned_bytes(ep):
    """Rank r loads node r's part; greedy tokens equal mlx-lm's on the unsliced conversion.
    Resident weight bytes (summed over the loaded arrays) are the plan's within 2%: the
    shared experts on rank 0 only, as the runtime keeps them and the planner counts them."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    from tests.placement.ranks import run_ranks

    plan, out, whole, _ = ep
    model, _ = load_model(whole)
    want = [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=MAX_TOKENS,
                                             sampler=lambda lp: mx.argmax(lp, axis=-1))]
    result = out.parent / "ranks.json"
    ranks = run_ranks(2, [WORKER, str(out), str(result), ",".join(map(str, PROMPT)), str(MAX_TOKENS), "part"],
                      timeout=300)
    assert all(rc == 0 for rc, _ in ranks), "\n".join(err for _, err in ranks)
    got = json.loads(result.read_text())
    assert got["ranks_agree"] and got["tokens"] == want
    parts = Manifest.load(out).stages[0].parts
    for part, resident in zip(parts, got["resident_bytes"]):
        planned = next(ld.weight_bytes for ld in plan.loads if ld.node == part.node)
        print(f"{part.node}: resident {resident} B, plan {planned} B, ratio {resident / planned:.4f}")
        assert abs(resident / planned - 1) < 0.02


def test_refusals(ep, tmp_path):
    from mlxdist.runtime.source import resolve_source

    _, out, _, plan_file = ep
    with pytest.raises(UserError, match="holds the experts in 2 parts .*run it on 2 ranks"):
        resolve_source(out, 3, expert_parallel=True)
    with pytest.raises(UserError, match="expert-parallel parts"):
        resolve_source(out, 2)
    doc = json.loads(plan_file.read_text())
    doc["stages"][0]["experts"]["small"] = doc["stages"][0]["experts"]["small"][1:]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="every expert 0..7 to exactly one node"):
        convert(ckpt_of(out), tmp_path / "o", plan=bad, progress=False)
