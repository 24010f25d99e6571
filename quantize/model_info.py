"""What mlx-lm expects of a model: parameter names and shapes, which modules quantize.

We build mlx-lm's own model from config.json without evaluating its (lazy, random)
parameters, so the names, shapes and quantizable layers come from mlx-lm rather than
from a second copy of its knowledge.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxdist.errors import UserError

SUPPORTED = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3")
# the number of routed experts, by model type (config key)
EXPERT_COUNT_KEY = {"qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts"}


@dataclass
class ModelInfo:
    config: dict[str, Any]
    model_type: str
    params: dict[str, tuple[int, ...]]  # mlx-lm parameter name -> shape (unquantized)
    quantizable: dict[str, nn.Module]  # module path -> module with to_quantized
    quant_predicate: Callable[[str, nn.Module], Any] | None
    cast_predicate: Callable[[str], bool]

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def num_experts(self) -> int:
        key = EXPERT_COUNT_KEY.get(self.model_type)
        return int(self.config.get(key) or 0) if key else 0


def model_info(config: dict[str, Any]) -> ModelInfo:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise UserError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(SUPPORTED)})"
        )
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    try:
        model = module.Model(module.ModelArgs.from_dict(config))
    except (TypeError, KeyError, ValueError) as e:
        raise UserError(f"config.json does not describe a valid {model_type} model: {e}") from None
    params = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    quantizable = {p: m for p, m in model.named_modules() if hasattr(m, "to_quantized")}
    return ModelInfo(
        config=config,
        model_type=model_type,
        params=params,
        quantizable=quantizable,
        quant_predicate=getattr(model, "quant_predicate", None),
        cast_predicate=getattr(model, "cast_predicate", lambda _: True),
    )
