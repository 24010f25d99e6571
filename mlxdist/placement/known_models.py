"""Built-in configs of well-known models, so `mlxdist plan deepseek-r1` runs offline.

Copied from each model's config.json on the Hugging Face hub (only the fields the
planner reads); the hub id is given beside each.
"""

from __future__ import annotations

from typing import Any

_DEEPSEEK_V3 = {  # deepseek-ai/DeepSeek-R1 and deepseek-ai/DeepSeek-V3 share this shape
    "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
    "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 3, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "vocab_size": 129280, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "deepseek-r1": dict(_DEEPSEEK_V3, _name_or_path="deepseek-ai/DeepSeek-R1"),
    "deepseek-v3": dict(_DEEPSEEK_V3, _name_or_path="deepseek-ai/DeepSeek-V3"),
    "qwen3-235b-a22b": {  # Qwen/Qwen3-235B-A22B
        "_name_or_path": "Qwen/Qwen3-235B-A22B", "model_type": "qwen3_moe",
        "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
        "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4,
        "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
        "vocab_size": 151936, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 40960, "torch_dtype": "bfloat16",
    },
    "llama-3.1-405b": {  # meta-llama/Llama-3.1-405B-Instruct
        "_name_or_path": "meta-llama/Llama-3.1-405B-Instruct", "model_type": "llama",
        "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
        "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
    },
    "llama-3.1-70b": {  # meta-llama/Llama-3.1-70B-Instruct
        "_name_or_path": "meta-llama/Llama-3.1-70B-Instruct", "model_type": "llama",
        "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
    },
    "qwen2.5-72b": {  # Qwen/Qwen2.5-72B-Instruct
        "_name_or_path": "Qwen/Qwen2.5-72B-Instruct", "model_type": "qwen2",
        "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
    },
}
