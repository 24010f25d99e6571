"""`mlxdist quantize --plan` with a mixed plan (pipeline stages beside one stage that is
expert-parallel over some of the nodes) writes the pipeline stages as usual and, for the
expert-parallel stage, one part per node in the format of a whole-group expert-parallel
conversion (docs/shard-format.md): each part holds only its node's routed experts, rows in
the plan's order, and everything else every member needs. Read back with safetensors'
own numpy reader, every tensor equals the unsliced conversion's (the routed experts: the
part's rows of it); the manifest's sha256s are the stored bytes; the manifest refuses
what the runtime cannot run; an interrupted conversion resumes byte-identical."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from quantize_helpers import make_checkpoint
from safetensors.numpy import load_file

import quantize.convert as qc
from mlxdist.errors import UserError
from mlxdist.placement import NodeSpec, place
from mlxdist.placement.cost import CostParams, Profile
from mlxdist.placement.model import load_model
from mlxdist.placement.plan import Stage
from mlxdist.placement.planner import Request, mixed_plan
from mlxdist.placement.specs import cluster_from_nodes
from mlxdist.shard_format import Manifest, StageJson
from quantize.convert import convert

GB = 1 << 30
# the expert-parallel stage in the middle (layers 2-3: one dense, one MoE layer), its
# experts in no particular order: b's rows are experts 6, 0, 2, 4, 7; c's 1, 3, 5
MIDDLE = (Stage((0, 2), ("a",)), Stage((2, 4), ("b", "c"), (("b", (6, 0, 2, 4, 7)), ("c", (1, 3, 5)))),
          Stage((4, 5), ("d",)))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The DeepSeek miniature (5 layers: 0-2 dense, 3-4 MoE; 8 routed experts; float32
    floats, as test_quantize_expert_parts.py), converted by two mixed plans (MIDDLE, priced
    by the planner; and the planner's own choice on three nodes, whose expert-parallel
    stage is last and so holds the head) and in one stage."""
    d = tmp_path_factory.mktemp("mixed-parts")
    ckpt = make_checkpoint.deepseek(d / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    model = load_model(str(ckpt))
    four = cluster_from_nodes([NodeSpec(n, 64 * GB, 800e9, 1e14, 0) for n in "abcd"])
    middle = mixed_plan(model, four, MIDDLE, Request(256, 1), CostParams(), Profile(model), "by hand")
    (d / "middle.json").write_text(json.dumps(middle.to_json()))
    three = [NodeSpec("a", 64 * GB, 800e9, 1e14, 0), NodeSpec("b", 64 * GB, 400e9, 1e14, 0),
             NodeSpec("c", 64 * GB, 200e9, 1e14, 0)]
    last = place(str(ckpt), three, context=256, concurrency=1, strategy="mixed")
    assert last.strategy == "mixed" and last.stages[-1].nodes == ("b", "c")
    (d / "last.json").write_text(json.dumps(last.to_json()))
    outs = {name: convert(ckpt, d / name, plan=d / f"{name}.json", progress=False) for name in ("middle", "last")}
    whole = convert(ckpt, d / "whole", stages=1, progress=False)
    return ckpt, outs, whole, d


def _layer(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def test_parts_hold_their_experts_rows_of_the_unsliced_conversion(mixed):
    _, outs, whole, _ = mixed
    full = load_file(str(whole / "stages" / "0" / "weights.safetensors"))
    for out in outs.values():
        manifest = Manifest.load(out)
        N = len(manifest.stages)
        (k,) = [s.stage for s in manifest.stages if s.parts]
        assert k > 0
        for s in manifest.stages:
            a, b = s.layers
            want = {n for n in full if (_layer(n) is not None and a <= _layer(n) < b)
                    or (_layer(n) is None and ("embed_tokens" in n) == (s.stage == 0)
                        and ("embed_tokens" in n or s.stage == N - 1))}
            if not s.parts:
                got = load_file(str(out / s.dir / "weights.safetensors"))
                assert set(got) == want
                assert all(got[n].dtype == full[n].dtype and np.array_equal(got[n], full[n]) for n in got)
                continue
            for part in s.parts:
                assert StageJson.load(out / part.dir) == StageJson(k, N, (a, b), False, k == N - 1, part.node,
                                                                   part.experts)
                got = load_file(str(out / part.dir / "weights.safetensors"))
                assert set(got) == want
                routed = [n for n in got if ".switch_mlp." in n]
                assert routed and all(_layer(n) >= 3 for n in routed)
                for n, x in got.items():
                    ref = full[n][list(part.experts)] if ".switch_mlp." in n else full[n]
                    assert x.dtype == ref.dtype and x.shape == ref.shape and np.array_equal(x, ref), n
                    if ".switch_mlp." in n:
                        assert x.shape[0] == len(part.experts) < full[n].shape[0]
        assert not list(out.glob("model-*.safetensors")) and not (out / "model.safetensors.index.json").exists()


def test_the_manifest_describes_the_parts_and_its_hashes_are_the_bytes(mixed):
    ckpt, outs, _, d = mixed
    out = outs["middle"]
    m = Manifest.load(out)
    assert m.options["stages"] == [[0, 2], [2, 4], [4, 5]]
    assert m.options["parts"] == [[], [["b", [6, 0, 2, 4, 7]], ["c", [1, 3, 5]]], []]
    s0, s1, s2 = m.stages
    assert not s0.parts and not s2.parts and s0.files == ("stages/0/weights.safetensors",)
    assert [(p.node, p.experts, p.dir, p.files) for p in s1.parts] == [
        ("b", (6, 0, 2, 4, 7), "stages/1/nodes/b", ("stages/1/nodes/b/weights.safetensors",)),
        ("c", (1, 3, 5), "stages/1/nodes/c", ("stages/1/nodes/c/weights.safetensors",))]
    assert s1.files == tuple(f for p in s1.parts for f in p.files)
    assert s1.nbytes == sum(p.nbytes for p in s1.parts)
    assert {t.stage for t in m.tensors.values()} == {0, 2}  # the parts' tensors are in the parts
    for stage, node in ((0, None), (2, None), (1, "b"), (1, "c")):
        table = m.tensors_of(stage, node)
        path = out / (m.stages[stage].part(node).dir if node else m.stages[stage].dir) / "weights.safetensors"
        got = load_file(str(path))
        assert set(table) == set(got)
        for n, t in table.items():
            assert (t.shape, t.nbytes) == (got[n].shape, got[n].nbytes)
            assert t.sha256 == hashlib.sha256(got[n].tobytes()).hexdigest(), n
        assert (m.stages[stage].part(node).nbytes if node else m.stages[stage].nbytes) == path.stat().st_size
    assert m.stage_bytes(out) == [sum(p.stat().st_size for p in (out / "stages" / str(k)).rglob("*") if p.is_file())
                                  for k in range(3)]
    assert convert(ckpt, out, plan=d / "middle.json", progress=False) == out  # the same conversion: done


def _move_parts(stage: dict, k: int) -> dict:
    """A stage entry's parts, as if written for stage k."""
    def moved(p: dict) -> dict:
        files = [f.replace(p["dir"], f"stages/{k}/nodes/{p['node']}") for f in p["files"]]
        tensors = {n: {**t, "file": files[0], "stage": k, "stages": [k]} for n, t in p["tensors"].items()}
        return {**p, "dir": f"stages/{k}/nodes/{p['node']}", "files": files, "tensors": tensors}

    parts = [moved(p) for p in stage["parts"]]
    return {**stage, "parts": parts, "files": [f for p in parts for f in p["files"]]}


def test_the_manifest_refuses_what_the_runtime_cannot_run(mixed, tmp_path):
    out = mixed[1]["middle"]
    doc = json.loads((out / "manifest.json").read_text())
    s0, s1, s2 = doc["stages"]
    b, c = s1["parts"]
    variants = [
        ({**doc, "stages": [{**_move_parts(s1, 0), "stage": 0, "layers": s0["layers"]},
                            {**{k: v for k, v in s1.items() if k != "parts"},
                             "files": ["stages/1/weights.safetensors"]}, s2]},
         r"stages\[0\] has parts: beside pipeline stages"),
        ({**doc, "stages": [s0, s1, {**_move_parts(s1, 2), "stage": 2, "layers": s2["layers"]}]},
         "stages 1, 2 have parts: at most one stage is expert-parallel"),
        ({**doc, "stages": [s0, {**s1, "parts": [b, {**c, "experts": [1, 3, 6]}]}, s2]},
         r"stages\[1\].parts must give each node some experts and each expert 0..7 to exactly one node"),
        ({**doc, "stages": [s0, {**s1, "parts": [b, {**c, "experts": [1, 3]}]}, s2]}, "each expert 0..7"),
        ({**doc, "stages": [s0, {**s1, "parts": [{**b, "dir": "stages/2/nodes/b"}, c]}, s2]},
         r"stages\[1\].parts\[0\].dir is 'stages/2/nodes/b'"),
    ]
    for bad, match in variants:
        with pytest.raises(ValueError, match=match):
            Manifest.from_json(bad)
    (tmp_path / "manifest.json").write_text(json.dumps(variants[0][0]))
    with pytest.raises(UserError) as e:
        Manifest.load(tmp_path)
    assert "\n" not in str(e.value) and "is not a format-1 manifest: stages[0] has parts" in str(e.value)
    assert Manifest.from_json(doc).to_json() == doc


def test_interrupted_then_resumed_is_byte_identical(mixed, tmp_path, monkeypatch):
    """Stopped inside c's part (b's recorded done), then while moving c's part into place:
    each rerun finishes, byte-identical to the uninterrupted conversion."""
    ckpt, outs, _, d = mixed
    out = tmp_path / "out"
    real_produce, real_replace = qc.produce, qc.os.replace
    calls = []

    def stop_in_c(planner, g):  # c holds 3 experts: its routed-experts groups have 3 rows
        if g.kind == "experts" and g.outs[0].shape[0] == 3:
            calls.append(g.key)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real_produce(planner, g)

    monkeypatch.setattr(qc, "THROTTLE", 1e-9)  # record every group as it is written
    monkeypatch.setattr(qc, "produce", stop_in_c)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, out, plan=d / "middle.json", progress=False)
    done = [json.loads(line)["id"] for line in (out / ".partial" / "done.jsonl").read_text().splitlines()]
    assert any(i.startswith("1-b:") for i in done) and sum(i.startswith("1-c:") for i in done) >= 1
    assert not (out / "manifest.json").exists() and not (out / "stages").exists()
    monkeypatch.setattr(qc, "produce", real_produce)

    def stop_moving_c(a, b):
        if str(b).endswith("stages/1/nodes/c/weights.safetensors"):
            raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(qc.os, "replace", stop_moving_c)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, out, plan=d / "middle.json", progress=False)
    monkeypatch.setattr(qc.os, "replace", real_replace)
    assert (out / "stages/1/nodes/b/weights.safetensors").exists() and not (out / "manifest.json").exists()
    convert(ckpt, out, plan=d / "middle.json", progress=False)
    assert _tree(out) == _tree(outs["middle"])


def test_plans_that_cannot_be_cut_are_refused_in_one_line(mixed, tmp_path):
    ckpt, _, _, d = mixed
    doc = json.loads((d / "middle.json").read_text())
    dense = {**doc, "stages": [{"layers": [0, 1], "nodes": ["a"]},
                               {"layers": [1, 3], "nodes": ["b", "c"], "experts": {"b": [0, 1, 2, 3], "c": [4, 5, 6, 7]}},
                               {"layers": [3, 5], "nodes": ["d"]}]}
    rank0 = {**doc, "stages": [{"layers": [0, 2], "nodes": ["a", "b"], "experts": {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]}},
                               {"layers": [2, 4], "nodes": ["c"]}, {"layers": [4, 5], "nodes": ["d"]}]}
    for plan, match in ((dense, r"stage \[1, 3\] is expert-parallel but none of its layers has routed experts"),
                        (rank0, r"is not a plan from `mlxdist plan --json`: stages\[0\]: a mixed plan's "
                                r"expert-parallel stage cannot include rank 0")):
        f = tmp_path / "plan.json"
        f.write_text(json.dumps(plan))
        with pytest.raises(UserError, match=match) as e:
            convert(ckpt, tmp_path / "o", plan=f, progress=False)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "o" / "manifest.json").exists()
