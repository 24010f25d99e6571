"""Which bits each layer gets. See docs/quantize.md for the reasoning."""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantize.model_info import ModelInfo

RECIPES = ("uniform", "mixed")
ATTENTION_BITS = 8  # used by every token, small next to the experts
DENSE_BITS = 6  # shared experts and dense MLPs: used by every token, large
EMBED_HEAD_BITS = 8  # the vocabulary projections are the most sensitive to quantization


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int


def _mixed_bits(path: str, bits: int) -> int | None:
    """Bits for the module at `path` in the mixed recipe; None keeps it unquantized."""
    if path.endswith("mlp.gate") or path.endswith(".gate"):  # MoE routers
        return None
    if ".switch_mlp." in path:  # routed experts: the bulk of an MoE model
        return bits
    if ".self_attn." in path:
        return max(bits, ATTENTION_BITS)
    if ".mlp." in path:  # shared experts and dense MLPs
        return max(bits, DENSE_BITS)
    if path.endswith("embed_tokens") or path == "lm_head":
        return max(bits, EMBED_HEAD_BITS)
    return bits


def quant_spec(
    info: ModelInfo, path: str, weight_shape: tuple[int, ...], recipe: str, bits: int, group_size: int
) -> QuantSpec | None:
    """How the module at `path` is quantized, None when it stays in floating point.
    `uniform` makes the same choices as `mlx_lm.convert` (its model's predicate included)."""
    module = info.quantizable.get(path)
    if module is None or weight_shape[-1] % group_size != 0:
        return None
    if recipe == "mixed":
        b = _mixed_bits(path, bits)
        return QuantSpec(b, group_size) if b is not None else None
    choice = info.quant_predicate(path, module) if info.quant_predicate else True
    if choice is False:
        return None
    if isinstance(choice, dict):
        return QuantSpec(int(choice.get("bits", bits)), int(choice.get("group_size", group_size)))
    return QuantSpec(bits, group_size)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None
