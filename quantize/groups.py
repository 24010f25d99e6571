"""From source tensors to output tensors, before reading any data.

A *group* is one unit of work: it reads a few source tensors and writes one or more
output tensors (a quantized linear gives .weight/.scales/.biases; a layer's routed
experts are read one by one and written stacked, as mlx-lm's SwitchGLU loads them). All
output names, shapes and dtypes are known up front, so each stage file's header can be
written first and the output checked against mlx-lm's model before any work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from mlxdist.errors import UserError
from quantize.fp8 import scale_shape
from quantize.model_info import ModelInfo
from quantize.recipe import QuantSpec, layer_of, quant_spec
from quantize.source_api import Source

FLOAT_DTYPES = ("BF16", "F16", "F32")
COMPUTE_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class Out:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Group:
    key: str  # the module path or tensor name it produces
    kind: str  # "plain" | "linear" | "experts" | "kv_b"
    part: str  # "embed" | "layer" | "head"
    layer: int | None
    sources: tuple[str, ...]  # source weight names, in read order
    specs: tuple[QuantSpec | None, ...]  # per produced module
    outs: tuple[Out, ...]
    read_bytes: int

    @property
    def out_bytes(self) -> int:
        return sum(_nbytes(o) for o in self.outs)


def _nbytes(o: Out) -> int:
    from quantize.safetensors_io import Slot

    return Slot(o.name, o.dtype, o.shape).nbytes


def quantized_outs(path: str, shape: tuple[int, ...], spec: QuantSpec | None, dtype: str) -> list[Out]:
    if spec is None:
        return [Out(f"{path}.weight", dtype, shape)]
    if (shape[-1] * spec.bits) % 32:
        raise UserError(f"{path}: input size {shape[-1]} does not pack into {spec.bits}-bit words")
    lead = shape[:-1]
    return [
        Out(f"{path}.weight", "U32", (*lead, shape[-1] * spec.bits // 32)),
        Out(f"{path}.scales", dtype, (*lead, shape[-1] // spec.group_size)),
        Out(f"{path}.biases", dtype, (*lead, shape[-1] // spec.group_size)),
    ]


class Planner:
    def __init__(self, source: Source, info: ModelInfo, bits: int, group_size: int, recipe: str, keep_mtp: bool,
                 keep_native: bool = False, dtype: str | None = None):
        self.source, self.info, self.keep_native = source, info, keep_native
        self.bits, self.group_size, self.recipe, self.keep_mtp = bits, group_size, recipe, keep_mtp
        # floating-point parameters and scales are stored in this dtype, as mlx_lm.convert does
        self.dtype = COMPUTE_DTYPES.get(dtype or str(info.config.get("torch_dtype", "bfloat16")), "BF16")
        self.fp8 = (info.config.get("quantization_config") or {}).get("quant_method") == "fp8"

    def only_experts(self, g: Group, ids: tuple[int, ...]) -> Group:
        """A routed-experts group cut to the experts `ids`, stacked in that order: what one
        node's part of an expert-parallel stage holds of it."""
        srcs = tuple(g.sources[e] for e in ids)
        outs = tuple(Out(o.name, o.dtype, (len(ids), *o.shape[1:])) for o in g.outs)
        return replace(g, sources=srcs, outs=outs, read_bytes=sum(self.read_bytes(s) for s in srcs))

    def float_shape(self, name: str) -> tuple[int, ...]:
        """Shape of a source weight once decoded to floating point, with its dtype checked."""
        t = self.source.tensors[name]
        if t.dtype == "F8_E4M3":
            if not self.fp8:
                raise UserError(f"{name} is FP8 but config.json has no fp8 quantization_config")
            scale = self.source.tensors.get(name + "_scale_inv")
            if scale is None:
                raise UserError(f"{name} is FP8 but has no weight_scale_inv")
            if len(t.shape) != 2 or scale.shape != scale_shape(t.shape):
                raise UserError(f"{name}_scale_inv has shape {scale.shape}, expected {scale_shape(t.shape)}")
            return t.shape
        base = name[: -len(".weight")]
        if base in self.source.native:
            bits, _ = self.source.native[base]
            return (*t.shape[:-1], t.shape[-1] * 32 // bits)
        if t.dtype not in FLOAT_DTYPES:
            raise UserError(f"{name} has dtype {t.dtype}; a floating-point weight was expected")
        return t.shape

    def read_bytes(self, name: str) -> int:
        base = name[: -len(".weight")]
        extra = [name + "_scale_inv", base + ".scales", base + ".biases"]
        return self.source.tensors[name].nbytes + sum(
            self.source.tensors[e].nbytes for e in extra if e in self.source.tensors
        )

    def spec_for(self, path: str, shape: tuple[int, ...]) -> QuantSpec | None:
        if self.keep_native and path in self.source.native and path in self.info.quantizable:
            return QuantSpec(*self.source.native[path])  # a GGUF's own quantization, kept as is
        layer = layer_of(path + ".")
        if layer is not None and layer >= self.info.num_layers:  # MTP: quantize like the last layer
            path = path.replace(f"model.layers.{layer}.", f"model.layers.{self.info.num_layers - 1}.", 1)
        return quant_spec(self.info, path, shape, self.recipe, self.bits, self.group_size)

    def _part(self, name: str) -> tuple[str, int | None]:
        layer = layer_of(name)
        if layer is not None:
            return "layer", layer
        return ("embed", None) if name.startswith("model.embed_tokens") else ("head", None)

    def plan(self) -> list[Group]:
        info, names = self.info, self.source.tensors
        consumed: set[str] = set()
        groups: list[Group] = []
        experts: dict[tuple[str, str], dict[int, str]] = {}
        for name in names:
            if "rotary_emb.inv_freq" in name or (info.tied and name.startswith("lm_head.")):
                consumed.add(name)
                continue
            layer = layer_of(name)
            if layer is not None and layer >= info.num_layers and not self.keep_mtp:
                consumed.add(name)
                continue
            if name.endswith(".scales") and name[: -len(".scales")] in self.source.native:  # read with .weight
                consumed.update({name, name[: -len(".scales")] + ".biases"})
            m = _EXPERT.match(name)
            if m:
                experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = name
        for (prefix, proj), by_index in sorted(experts.items()):
            count = info.num_experts or len(by_index)
            missing = [e for e in range(count) if e not in by_index]
            if missing or len(by_index) != count:
                raise UserError(f"{prefix}: expert {missing[0] if missing else count} {proj} missing or extra "
                                f"(config says {count} experts)")
            srcs = tuple(by_index[e] for e in range(count))
            shapes = {self.float_shape(s) for s in srcs}
            if len(shapes) != 1:
                raise UserError(f"{prefix}.experts.*.{proj}: experts differ in shape")
            shape = (count, *shapes.pop())
            path = f"{prefix}.switch_mlp.{proj}"
            spec = self.spec_for(path, shape)
            groups.append(Group(path, "experts", "layer", layer_of(path), srcs, (spec,),
                                tuple(quantized_outs(path, shape, spec, self.dtype)),
                                sum(self.read_bytes(s) for s in srcs)))
            consumed.update(srcs)
        for name, t in names.items():
            if name in consumed or name.endswith("_scale_inv"):
                continue
            base = name[: -len(".weight")] if name.endswith(".weight") else None
            part, layer = self._part(name)
            if base and base.endswith("self_attn.kv_b_proj") and info.model_type == "deepseek_v3":
                groups.append(self._kv_b(base, name, layer))
            elif base and (base in info.quantizable or base in self.source.native or self._mtp_quantizable(base)):
                shape = self.float_shape(name)
                spec = self.spec_for(base, shape)
                groups.append(Group(base, "linear", part, layer, (name,), (spec,),
                                    tuple(quantized_outs(base, shape, spec, self.dtype)), self.read_bytes(name)))
            else:
                dtype = t.dtype
                if t.dtype == "F8_E4M3":
                    dtype = "BF16"
                elif t.dtype in FLOAT_DTYPES and info.cast_predicate(name):
                    dtype = self.dtype
                shape = self.float_shape(name) if t.dtype == "F8_E4M3" else t.shape
                groups.append(Group(name, "plain", part, layer, (name,), (None,),
                                    (Out(name, dtype, shape),), self.read_bytes(name) if base else t.nbytes))
        rank = {"embed": 0, "layer": 1, "head": 2}
        groups.sort(key=lambda g: (rank[g.part], g.layer if g.layer is not None else -1, g.key))
        self._check_against_model(groups)
        return groups

    def _mtp_quantizable(self, base: str) -> bool:
        layer = layer_of(base + ".")
        if layer is None or layer < self.info.num_layers:
            return False
        return base.replace(f"model.layers.{layer}.", f"model.layers.{self.info.num_layers - 1}.", 1) in self.info.quantizable

    def _kv_b(self, base: str, name: str, layer: int | None) -> Group:
        """DeepSeek MLA: kv_b_proj is split per head into embed_q and unembed_out, as
        mlx-lm's deepseek_v3 `sanitize` does."""
        c = self.info.config
        heads, nope, v_dim, rank = (int(c["num_attention_heads"]), int(c["qk_nope_head_dim"]),
                                    int(c["v_head_dim"]), int(c["kv_lora_rank"]))
        shape = self.float_shape(name)
        if shape != (heads * (nope + v_dim), rank):
            raise UserError(f"{name} has shape {shape}, config.json implies {(heads * (nope + v_dim), rank)}")
        attn = base[: -len(".kv_b_proj")]
        parts = [(f"{attn}.embed_q", (heads, rank, nope)), (f"{attn}.unembed_out", (heads, v_dim, rank))]
        specs = tuple(self.spec_for(p, s) for p, s in parts)
        outs = [o for (p, s), q in zip(parts, specs) for o in quantized_outs(p, s, q, self.dtype)]
        return Group(base, "kv_b", "layer", layer, (name,), specs, tuple(outs), self.read_bytes(name))

    def _check_against_model(self, groups: list[Group]) -> None:
        """The unquantized output must be exactly mlx-lm's model for config.json."""
        produced: dict[str, tuple[int, ...]] = {}
        for g in groups:
            if g.layer is not None and g.layer >= self.info.num_layers:
                continue  # the MTP layer (--keep-mtp) is not part of mlx-lm's model
            if g.kind == "plain":
                produced[g.outs[0].name] = g.outs[0].shape
            elif g.kind == "kv_b":
                c = self.info.config
                heads, nope, v_dim, rank = (int(c["num_attention_heads"]), int(c["qk_nope_head_dim"]),
                                            int(c["v_head_dim"]), int(c["kv_lora_rank"]))
                attn = g.key[: -len(".kv_b_proj")]
                produced[f"{attn}.embed_q.weight"] = (heads, rank, nope)
                produced[f"{attn}.unembed_out.weight"] = (heads, v_dim, rank)
            else:
                src = self.float_shape(g.sources[0])
                produced[f"{g.key}.weight"] = (len(g.sources), *src) if g.kind == "experts" else src
        expected = self.info.params
        missing = sorted(set(expected) - set(produced))
        if missing:
            raise UserError(f"checkpoint lacks {missing[0]}, which config.json's {self.info.model_type} model needs"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = sorted(set(produced) - set(expected))
        if extra:
            raise UserError(f"checkpoint has {extra[0]}, which config.json's {self.info.model_type} model does not know")
        for name, shape in produced.items():
            if tuple(expected[name]) != tuple(shape):
                raise UserError(f"{name} has shape {list(shape)} but config.json implies {list(expected[name])}")
