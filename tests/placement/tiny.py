"""Tiny random mlx-lm models for the placement tests (written with mlx-lm's own classes)."""

from __future__ import annotations

from pathlib import Path

TINY_DEEPSEEK = {
    "model_type": "deepseek_v3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "moe_intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 4, "n_shared_experts": 1, "n_routed_experts": 16,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": 48, "qk_rope_head_dim": 16,
    "v_head_dim": 16, "qk_nope_head_dim": 32, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "norm_topk_prob": True, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4,
    "moe_layer_freq": 1, "first_k_dense_replace": 1, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "tie_word_embeddings": False,
}


def make_tiny_deepseek(path: Path, seed: int = 0, config: dict | None = None) -> Path:
    """A float32 tiny deepseek_v3 (gather_mm on CPU takes float32 only), random routing."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import deepseek_v3
    from mlx_lm.utils import save_config, save_model

    config = dict(config or TINY_DEEPSEEK)
    mx.random.seed(seed)
    model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(config))
    params = dict(tree_flatten(model.parameters()))
    for k, v in params.items():  # the gate starts at zero in mlx-lm: give routing something to do
        if k.endswith("gate.weight"):
            params[k] = mx.random.normal(v.shape) * 0.5
        elif k.endswith("e_score_correction_bias"):
            params[k] = mx.random.normal(v.shape) * 0.1
        elif "switch_mlp" in k or "shared_experts" in k:
            params[k] = mx.random.normal(v.shape) * 0.2
    model.update(tree_unflatten(list(params.items())))
    mx.eval(model.parameters())
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(config, config_path=path / "config.json")
    return path
