"""bf16 Llama checkpoints: the output equals mlx_lm.convert's bit for bit, loads with
mlx_lm.load, and its stages chained give the same logits; manifest, index and links."""

from __future__ import annotations

import hashlib
import json
import struct

import mlx.core as mx
import pytest
from quantize_helpers import chained_logits, llama_ckpt, llama_tied_ckpt  # noqa: F401 (fixtures)

from quantize.convert import convert

TOKENS = mx.array([[256, 72, 101, 108, 108, 111, 44, 32, 119]])


@pytest.fixture(scope="module")
def llama_out(llama_ckpt, tmp_path_factory):
    return convert(llama_ckpt, tmp_path_factory.mktemp("out") / "llama", stages=2, progress=False)


def _equals_mlx_lm_convert(ckpt, out, tmp_path, stages=2):
    from mlx_lm.convert import convert as mlx_lm_convert

    mlx_lm_convert(str(ckpt), str(tmp_path / "ref"), quantize=True, q_bits=4, q_group_size=64)
    llama_out = out
    ref = {}
    for f in (tmp_path / "ref").glob("model*.safetensors"):
        ref.update(mx.load(str(f)))
    ours = {}
    for k in range(stages):
        ours.update(mx.load(str(llama_out / "stages" / str(k) / "weights.safetensors")))
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and mx.array_equal(ours[k], ref[k]).item(), k
    ref_config = json.loads((tmp_path / "ref" / "config.json").read_text())
    our_config = json.loads((llama_out / "config.json").read_text())
    assert our_config["quantization"] == ref_config["quantization"]


def test_equals_mlx_lm_convert(llama_ckpt, llama_out, tmp_path):
    _equals_mlx_lm_convert(llama_ckpt, llama_out, tmp_path)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3_moe"])
def test_qwen_equals_mlx_lm_convert(arch, tmp_path):
    from quantize_helpers import make_checkpoint

    ckpt = make_checkpoint.qwen(tmp_path / arch, arch)
    out = convert(ckpt, tmp_path / "out", stages=3, progress=False)
    _equals_mlx_lm_convert(ckpt, out, tmp_path, stages=3)
    _check_logits(out)


def _check_logits(out):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(out))
    whole = model(TOKENS)
    assert mx.array_equal(whole, chained_logits(out, TOKENS)).item()
    assert tokenizer.encode("hi") and tokenizer.eos_token_id == 257


def test_load_and_chained_stages(llama_out):
    _check_logits(llama_out)


def test_tied_embeddings_three_stages(llama_tied_ckpt, tmp_path):
    out = convert(llama_tied_ckpt, tmp_path / "tied", stages=3, progress=False)
    _check_logits(out)
    stage = {k: json.loads((out / "stages" / str(k) / "stage.json").read_text()) for k in range(3)}
    assert [s["layers"] for s in stage.values()] == [[0, 1], [1, 2], [2, 3]]
    assert [s["has_embedding"] for s in stage.values()] == [True, False, True]
    assert [s["has_head"] for s in stage.values()] == [False, False, True]
    last = mx.load(str(out / "stages" / "2" / "weights.safetensors"))
    assert "model.embed_tokens.weight" in last and "model.norm.weight" in last
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensors"]["model.embed_tokens.weight"]["stages"] == [0, 2]


def _raw_tensors(path):
    """name -> (dtype, shape, bytes), read per the safetensors format, not our reader."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[8 + n + v["data_offsets"][0]: 8 + n + v["data_offsets"][1]])
            for k, v in header.items()}


def test_layout_manifest_index(llama_out):
    out = llama_out
    assert not (out / ".partial").exists()
    for k in (0, 1):
        stage = json.loads((out / "stages" / str(k) / "stage.json").read_text())
        assert stage == {"format_version": 1, "stage": k, "num_stages": 2, "layers": [[0, 2], [2, 4]][k],
                         "has_embedding": k == 0, "has_head": k == 1}
        assert json.loads((out / "stages" / str(k) / "config.json").read_text()) == json.loads(
            (out / "config.json").read_text())
        assert (out / "stages" / str(k) / "tokenizer.json").exists()
        link = out / f"model-0000{k + 1}-of-00002.safetensors"
        assert link.is_symlink() and link.resolve() == (out / "stages" / str(k) / "weights.safetensors").resolve()
    manifest = json.loads((out / "manifest.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert manifest["format_version"] == 1 and len(manifest["source"]["sha256"]) == 64
    seen = 0
    for k in (0, 1):
        raw = _raw_tensors(out / "stages" / str(k) / "weights.safetensors")
        for name, (dtype, shape, data) in raw.items():
            t = manifest["tensors"][name]
            assert (t["stage"], t["dtype"], t["shape"], t["bytes"]) == (k, dtype, shape, len(data))
            assert t["sha256"] == hashlib.sha256(data).hexdigest()
            assert index["weight_map"][name] == f"model-0000{k + 1}-of-00002.safetensors"
            layer = t["layer"]
            if name.startswith("model.layers."):
                assert layer == int(name.split(".")[2]) and [0, 2][k] <= layer < [2, 4][k]
            seen += 1
    assert seen == len(manifest["tensors"]) == len(index["weight_map"])
    assert (out / "manifest.json").stat().st_mtime_ns >= max(
        p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")


def test_manifest_types_read_what_convert_wrote(llama_out, tmp_path):
    """Manifest.load reads the conversion back exactly (to_json gives the file's JSON), its
    helpers say what the stages are, and the variants the format does not allow are
    refused with the field named."""
    from mlxdist.errors import UserError
    from mlxdist.shard_format import Manifest, read_safetensors_header
    from quantize.safetensors_io import read_header

    doc = json.loads((llama_out / "manifest.json").read_text())
    m = Manifest.load(llama_out)
    assert m.to_json() == doc
    assert m.stage_ranges() == [(0, 2), (2, 4)]
    assert m.stage_bytes(llama_out) == [sum(p.stat().st_size for p in (llama_out / "stages" / str(k)).iterdir())
                                        for k in (0, 1)]
    weights = llama_out / "stages" / "1" / "weights.safetensors"
    assert set(m.tensors_of(1)) == set(read_safetensors_header(weights))
    assert {n: (t.dtype, t.shape, t.end - t.start) for n, t in read_header(weights).items()} == {
        n: (t.dtype, t.shape, t.nbytes) for n, t in read_safetensors_header(weights).items()}
    name = next(iter(doc["tensors"]))
    variants = [
        ({**doc, "tensors": [{"name": n, **t} for n, t in doc["tensors"].items()]}, "tensors must be an object"),
        ({**doc, "tensors": {name: {k: v for k, v in doc["tensors"][name].items() if k != "stages"}}},
         f"tensors.{name} lacks stages"),
        ({**doc, "stages": [{**s, "stages": [s["stage"]]} for s in doc["stages"]]},
         "stages\\[0\\] has keys the format does not define: stages"),
        ({**doc, "tensors": {name: {**doc["tensors"][name], "dtype": "float32"}}}, "is not a safetensors dtype"),
        ({**doc, "source": {"path": "x", "sha256": ""}}, "source lacks kind"),
        ({**doc, "stages": doc["stages"][::-1]}, "stages\\[0\\] must be stage 0"),
        ({**doc, "format_version": 2}, "format_version is 2"),
    ]
    for bad, match in variants:
        with pytest.raises(ValueError, match=match):
            Manifest.from_json(bad)
    (tmp_path / "manifest.json").write_text(json.dumps(variants[0][0]))
    with pytest.raises(UserError, match="is not a format-1 manifest: tensors must be an object"):
        Manifest.load(tmp_path)


def test_plan_file_and_mixed_recipe(llama_ckpt, tmp_path):
    import mlx_lm

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"stages": [{"layers": [0, 1], "node": "a"}, {"layers": [1, 4], "node": "b"}],
                                "other": 1}))
    out = convert(llama_ckpt, tmp_path / "mixed", plan=plan, recipe="mixed", progress=False)
    assert [json.loads((out / "stages" / str(k) / "stage.json").read_text())["layers"] for k in (0, 1)] == [[0, 1], [1, 4]]
    model, _ = mlx_lm.load(str(out))  # mlx-lm reads the per-layer bits from config.json
    attn, mlp = model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.up_proj
    assert (attn.bits, mlp.bits, model.model.embed_tokens.bits, model.lm_head.bits) == (8, 6, 8, 8)
    assert model.model.layers[0].input_layernorm.weight.dtype == mx.bfloat16
    w = mx.load(str(out / "stages" / "1" / "weights.safetensors"))
    ref_w, ref_s, ref_b = w["model.layers.1.mlp.up_proj.weight"], w["model.layers.1.mlp.up_proj.scales"], None
    assert ref_w.shape[-1] * 32 // 6 == ref_s.shape[-1] * 64  # 6-bit packing
    assert chained_logits(out, TOKENS).shape == model(TOKENS).shape
    assert mx.array_equal(chained_logits(out, TOKENS), model(TOKENS)).item()


def test_rerun_of_finished_output_is_a_no_op(llama_ckpt, llama_out):
    before = (llama_out / "manifest.json").stat().st_mtime_ns
    convert(llama_ckpt, llama_out, stages=2, progress=False)
    assert (llama_out / "manifest.json").stat().st_mtime_ns == before


def test_close_to_unquantized(llama_ckpt, llama_out, tmp_path):
    """Against the bf16 checkpoint as mlx-lm loads it (in float32). Random tiny weights are
    the worst case for 4 bits, so the tight bound is at 8 bits."""
    import mlx_lm
    from mlx.utils import tree_map

    def as_float32(model):
        model.update(tree_map(lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v,
                              model.parameters()))
        return model

    want = as_float32(mlx_lm.load(str(llama_ckpt))[0])(TOKENS)
    for bits, bound in ((4, 0.5), (8, 0.05)):
        out = llama_out if bits == 4 else convert(llama_ckpt, tmp_path / "q8", bits=8, progress=False)
        got = as_float32(mlx_lm.load(str(out))[0])(TOKENS)
        rel = (mx.linalg.norm(got - want) / mx.linalg.norm(want)).item()
        assert rel < bound, (bits, rel)
