"""DeepSeek-R1-style FP8 checkpoints: dequantization bit for bit against numpy/ml_dtypes,
every quantized tensor against mx.quantize of that reference, the whole output against
mlx-lm's own deepseek_v3 sanitize + quantize_model, and logits."""

from __future__ import annotations

import json

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
from quantize_helpers import chained_logits, deepseek_ckpt, deepseek_out  # noqa: F401 (fixtures)
from make_checkpoint import fp8_blocks

from quantize.fp8 import dequantize_fp8
from quantize.safetensors_io import read_header, read_tensor


def numpy_dequant(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Independent reference: e4m3 -> float32, times the block's scale, rounded to bf16."""
    m, n = q.shape
    s = np.repeat(np.repeat(scale, 128, axis=0), 128, axis=1)[:m, :n]
    return (q.astype(np.float32) * s).astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("shape", [(128, 128), (320, 192), (64, 7), (257, 129)])
def test_fp8_dequant_bit_identical(shape):
    rng = np.random.default_rng(0)
    q, s = fp8_blocks(rng.standard_normal(shape).astype(np.float32) * 3)
    got = dequantize_fp8(mx.array(q.view(np.uint8)), mx.array(s))
    want = numpy_dequant(q, s)
    assert got.dtype == mx.bfloat16
    assert np.array_equal(np.array(got.view(mx.uint16)), want.view(np.uint16))


def _source(ckpt):
    tensors = {}
    for f in sorted(ckpt.glob("model-*.safetensors")):
        tensors.update(read_header(f))
    return tensors


def _ref(tensors, name) -> mx.array:
    q = np.array(read_tensor(tensors[name])).view(ml_dtypes.float8_e4m3fn)
    s = np.array(read_tensor(tensors[name + "_scale_inv"]))
    return mx.array(numpy_dequant(q, s).view(np.uint16)).view(mx.bfloat16)


def _same_quant(out, path, w):
    if w.shape[-1] % 64:  # mlx-lm leaves these unquantized too
        assert f"{path}.scales" not in out and mx.array_equal(out[f"{path}.weight"], w).item(), path
        return
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    for suffix, want in (("weight", wq), ("scales", scales), ("biases", biases)):
        got = out[f"{path}.{suffix}"]
        assert got.dtype == want.dtype and mx.array_equal(got, want).item(), f"{path}.{suffix}"


def test_each_quantized_tensor_equals_mx_quantize_of_reference(deepseek_ckpt, deepseek_out):
    src = _source(deepseek_ckpt)
    out = {}
    for k in (0, 1):
        out.update(mx.load(str(deepseek_out / "stages" / str(k) / "weights.safetensors")))
    config = json.loads((deepseek_ckpt / "config.json").read_text())
    heads, nope = config["num_attention_heads"], config["qk_nope_head_dim"]
    checked = 0
    for name in src:
        if not name.endswith(".weight") or src[name].dtype != "F8_E4M3" or name.startswith("model.layers.5."):
            continue
        w = _ref(src, name)
        path = name[: -len(".weight")]
        if ".experts." in path:
            prefix, rest = path.split(".experts.")
            e, proj = rest.split(".", 1)
            stacked = f"{prefix}.switch_mlp.{proj}"
            sliced = {f"{stacked}.{s}": out[f"{stacked}.{s}"][int(e)] for s in ("weight", "scales", "biases")}
            _same_quant(sliced, stacked, w)
        elif path.endswith("kv_b_proj"):
            v = w.reshape(heads, nope + config["v_head_dim"], -1)
            attn = path[: -len(".kv_b_proj")]
            _same_quant(out, f"{attn}.embed_q", mx.contiguous(v[:, :nope, :].swapaxes(-1, -2)))
            _same_quant(out, f"{attn}.unembed_out", mx.contiguous(v[:, nope:, :]))
        else:
            _same_quant(out, path, w)
        checked += 1
    assert checked > 50
    # the MTP layer (model.layers.5 here, 61 in R1) is dropped by default
    assert not any(k.startswith("model.layers.5.") for k in out)
    # router bias stays float32, router gate unquantized bf16
    assert out["model.layers.3.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    assert out["model.layers.3.mlp.gate.weight"].dtype == mx.bfloat16


def _mlx_lm_reference(ckpt):
    """mlx-lm's own path: load all, sanitize (FP8 dequant, expert stacking, MLA split),
    cast to torch_dtype, quantize_model."""
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.models import deepseek_v3
    from mlx_lm.utils import quantize_model

    config = json.loads((ckpt / "config.json").read_text())
    weights = {}
    for f in sorted(ckpt.glob("model-*.safetensors")):
        weights.update(mx.load(str(f)))
    weights = {k: v for k, v in weights.items() if not k.startswith("model.layers.5.")}
    model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(config))
    model.load_weights(list(model.sanitize(weights).items()))
    cast = model.cast_predicate
    model.update(tree_map_with_path(
        lambda k, v: v.astype(mx.bfloat16) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v,
        model.parameters()))
    float32 = tree_map_with_path(lambda k, v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v,
                                 model.parameters())
    model, _ = quantize_model(model, config, 64, 4)
    return model, dict(tree_flatten(model.parameters())), float32


def test_output_matches_mlx_lm_and_stages_chain(deepseek_ckpt, deepseek_out, tmp_path):
    import mlx_lm
    from mlx.utils import tree_map

    from quantize.convert import convert
    from mlx_lm.models import deepseek_v3

    ref_model, ref, float32 = _mlx_lm_reference(deepseek_ckpt)
    out = {}
    for k in (0, 1):
        out.update(mx.load(str(deepseek_out / "stages" / str(k) / "weights.safetensors")))
    assert set(out) == set(ref)
    for k in ref:
        assert out[k].dtype == ref[k].dtype and mx.array_equal(out[k], ref[k]).item(), k

    tokens = mx.array([[256, 72, 101, 108, 108, 111, 33]])
    model, _ = mlx_lm.load(str(deepseek_out))
    whole = model(tokens)
    chained = chained_logits(deepseek_out, tokens)
    assert mx.array_equal(whole, chained).item()
    # close to the unquantized model at 8 bits (4 bits on random tiny weights is too coarse
    # for a tight bound; it is checked bit for bit against mlx-lm above)
    config = json.loads((deepseek_ckpt / "config.json").read_text())
    fmodel = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(config))
    fmodel.update(float32)  # float32: MLX's CPU gather_mm takes only float32
    want = fmodel(tokens)
    out8 = convert(deepseek_ckpt, tmp_path / "ds8", bits=8, progress=False)
    model8, _ = mlx_lm.load(str(out8))
    model8.update(tree_map(lambda v: v.astype(mx.float32) if v.dtype == mx.bfloat16 else v, model8.parameters()))
    got = model8(tokens)
    rel = (mx.linalg.norm(got - want) / mx.linalg.norm(want)).item()
    assert rel < 0.05, rel
    assert (got.argmax(-1) == want.argmax(-1)).astype(mx.float32).mean().item() >= 0.7


def test_keep_mtp(deepseek_ckpt, tmp_path):
    from quantize.convert import convert

    out = convert(deepseek_ckpt, tmp_path / "mtp", keep_mtp=True, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    mtp = {n: t for n, t in manifest["tensors"].items() if n.startswith("model.layers.5.")}
    assert "model.layers.5.eh_proj.weight" in mtp and "model.layers.5.mlp.switch_mlp.up_proj.scales" in mtp
    assert all(t["layer"] == 5 for t in mtp.values())


def test_mixed_recipe_bits_per_tensor(deepseek_ckpt, tmp_path):
    import mlx_lm

    from quantize.convert import convert

    out = convert(deepseek_ckpt, tmp_path / "mixed", recipe="mixed", stages=2, progress=False)
    model, _ = mlx_lm.load(str(out))  # per-layer bits read from config.json by mlx-lm
    dense, moe = model.model.layers[0], model.model.layers[3]
    assert moe.mlp.switch_mlp.gate_proj.bits == 4  # routed experts
    assert moe.mlp.shared_experts.up_proj.bits == 6 and dense.mlp.down_proj.bits == 6
    assert dense.self_attn.kv_a_proj_with_mqa.bits == 8 and dense.self_attn.o_proj.bits == 8
    assert dense.self_attn.unembed_out.bits == 8
    assert model.model.embed_tokens.bits == 8 and model.lm_head.bits == 8
    w = mx.load(str(out / "stages" / "1" / "weights.safetensors"))
    assert "model.layers.3.mlp.gate.scales" not in w and "model.layers.3.input_layernorm.scales" not in w
    assert mx.array_equal(model(mx.array([[1, 2, 3]])), chained_logits(out, mx.array([[1, 2, 3]]))).item()
