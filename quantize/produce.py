"""Computing a group's output tensors from its source tensors."""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx

from quantize.fp8 import dequantize_fp8
from quantize.groups import Group, Planner
from quantize.recipe import QuantSpec
from quantize.safetensors_io import DTYPES

Step = list[tuple[str, mx.array]]  # (output name, the next rows of that tensor)


def _dtype(name: str) -> mx.Dtype:
    return DTYPES[name][0]


def load_float(planner: Planner, name: str) -> mx.array:
    """A source weight decoded to floating point (FP8 and GGUF blocks dequantized)."""
    src, t = planner.source, planner.source.tensors[name]
    if t.dtype == "F8_E4M3":
        return dequantize_fp8(src.read(name), src.read(name + "_scale_inv"))
    base = name[: -len(".weight")]
    if base in src.native:
        bits, group_size = src.native[base]
        return mx.dequantize(src.read(name), src.read(base + ".scales"), src.read(base + ".biases"),
                             group_size=group_size, bits=bits)
    return src.read(name)


def _linear(planner: Planner, path: str, weight_name: str, spec: QuantSpec | None, dtype: mx.Dtype,
            weight: mx.array | None = None) -> Step:
    src = planner.source
    base = weight_name[: -len(".weight")]
    native = src.native.get(base) if weight is None else None
    if native is not None and spec is not None and (spec.bits, spec.group_size) == native:
        # already quantized as asked: copied, not requantized
        return [(f"{path}.weight", src.read(weight_name)), (f"{path}.scales", src.read(base + ".scales").astype(dtype)),
                (f"{path}.biases", src.read(base + ".biases").astype(dtype))]
    w = (load_float(planner, weight_name) if weight is None else weight).astype(dtype)
    if spec is None:
        return [(f"{path}.weight", w)]
    wq, scales, biases = mx.quantize(w, group_size=spec.group_size, bits=spec.bits)
    return [(f"{path}.weight", wq), (f"{path}.scales", scales), (f"{path}.biases", biases)]


def produce(planner: Planner, g: Group) -> Iterator[Step]:
    """The group's output, in steps; each step's arrays are the next rows of their tensors
    (experts come one at a time, so a stacked tensor never sits in memory whole)."""
    dtype = _dtype(planner.dtype)
    if g.kind == "plain":
        out = g.outs[0]
        x = load_float(planner, g.sources[0]) if planner.source.tensors[g.sources[0]].dtype == "F8_E4M3" \
            else planner.source.read(g.sources[0])
        yield [(out.name, x.astype(_dtype(out.dtype)))]
    elif g.kind == "linear":
        yield _linear(planner, g.key, g.sources[0], g.specs[0], dtype)
    elif g.kind == "experts":
        for name in g.sources:
            yield _linear(planner, g.key, name, g.specs[0], dtype)
    elif g.kind == "kv_b":
        c = planner.info.config
        heads, nope = int(c["num_attention_heads"]), int(c["qk_nope_head_dim"])
        v = load_float(planner, g.sources[0])
        v = v.reshape(heads, nope + int(c["v_head_dim"]), -1)
        wk = mx.contiguous(v[:, :nope, :].swapaxes(-1, -2))
        wv = mx.contiguous(v[:, nope:, :])
        attn = g.key[: -len(".kv_b_proj")]
        yield (_linear(planner, f"{attn}.embed_q", g.sources[0], g.specs[0], dtype, wk)
               + _linear(planner, f"{attn}.unembed_out", g.sources[0], g.specs[1], dtype, wv))
    else:
        raise AssertionError(g.kind)
