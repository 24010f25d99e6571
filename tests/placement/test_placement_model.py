"""Model sizes from config.json against what mlx-lm really allocates (independent reference:
mlx-lm's own classes, quantized by mlx-lm's own quantize_model)."""

from __future__ import annotations

import json

import pytest

from mlxdist.errors import UserError
from mlxdist.placement.model import describe, load_model
from tests.placement.tiny import TINY_DEEPSEEK

TINY = {
    "llama": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False},
    "llama_tied": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 256, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 160, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "rope_theta": 10000.0},
    "qwen3": {"model_type": "qwen3", "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 256,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_theta": 10000.0,
              "max_position_embeddings": 512},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 3,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 256,
                  "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [0],
                  "moe_intermediate_size": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                  "rope_theta": 10000.0, "max_position_embeddings": 512, "norm_topk_prob": True},
    "deepseek_v3": dict(TINY_DEEPSEEK, hidden_size=128, q_lora_rank=64, kv_lora_rank=64, moe_intermediate_size=64),
}


def mlx_lm_bytes(config: dict, bits: int):
    """(per-layer bytes, non-layer bytes, KV bytes per token per layer) of a real mlx-lm model."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import _get_classes, quantize_model

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    keep = getattr(model, "cast_predicate", lambda k: True)  # mlx-lm keeps some tensors fp32
    model.update(tree_unflatten([(k, v.astype(mx.float16) if keep(k) else v)
                                 for k, v in tree_flatten(model.parameters())]))
    if bits != 16:
        model, _ = quantize_model(model, dict(config), group_size=64, bits=bits)
    params = dict(tree_flatten(model.parameters()))
    per_layer = [0] * config["num_hidden_layers"]
    other = 0
    for name, v in params.items():
        parts = name.split(".")
        if "layers" in parts:
            per_layer[int(parts[parts.index("layers") + 1])] += v.nbytes
        else:
            other += v.nbytes
    cache = make_prompt_cache(model)
    n = 5
    model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    kv = []
    for c in cache:
        k, v = c.keys, c.values
        kv.append((k[..., :n, :].nbytes + v[..., :n, :].nbytes) // n)
    return per_layer, other, kv


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("bits", [4, 16])
def test_bytes_match_mlx_lm(arch: str, bits: int) -> None:
    config = TINY[arch]
    spec = describe(config, bits=bits, dtype_bytes=2)
    per_layer, other, kv = mlx_lm_bytes(config, bits)
    assert [layer.total_bytes for layer in spec.layers] == per_layer
    # a tied head is the embedding itself: only the final norm is extra
    head = spec.hidden_size * 2 if spec.tied_embeddings else spec.head
    assert spec.embedding + head == other
    assert [layer.kv_bytes_per_token for layer in spec.layers] == kv


def test_deepseek_caches_the_compressed_latent() -> None:
    """mlx-lm's DeepseekV3Attention caches (kv_lora_rank + qk_rope_head_dim) values per
    token and layer, not expanded keys and values."""
    c = TINY["deepseek_v3"]
    spec = describe(c, bits=4, dtype_bytes=2)
    assert spec.layers[0].kv_bytes_per_token == (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * 2


def test_known_models_have_their_published_sizes() -> None:
    r1 = load_model("deepseek-r1", bits=16)
    assert 670e9 < r1.total_bytes / 2 < 672e9  # 671B parameters
    assert r1.num_layers == 61 and sum(x.is_moe for x in r1.layers) == 58
    bits_per_weight = load_model("deepseek-r1", bits=4).total_bytes / r1.total_bytes * 16
    assert 4.45 < bits_per_weight < 4.55  # 4 bits + an fp16 scale and bias per 64 weights


def test_unknown_model_and_bad_bits_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="neither a config.json"):
        load_model("no-such-model")
    (tmp_path / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(UserError, match="not supported"):
        load_model(str(tmp_path))
    with pytest.raises(UserError, match="bits"):
        load_model("deepseek-r1", bits=7)


def test_plan_of_a_quantized_mlx_lm_directory_matches_its_files(tmp_path) -> None:
    """`mlxdist plan DIR` sizes an mlx-lm directory as its safetensors files say (the file
    format is the reference), taking bits and group size from the config."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    from tests.conftest import run_mlxdist

    config = dict(TINY["qwen3_moe"], torch_dtype="float16")
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.update(tree_unflatten([(k, v.astype(mx.float16)) for k, v in tree_flatten(model.parameters())]))
    model, qconfig = quantize_model(model, dict(config), group_size=32, bits=3)
    save_model(tmp_path, model)
    save_config(qconfig, config_path=tmp_path / "config.json")
    file_bytes = 0
    for f in tmp_path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        file_bytes += sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items()
                          if k != "__metadata__")
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps({"nodes": [{"name": "one", "memory_gb": 16, "bandwidth_gbs": 100}]}))
    r = run_mlxdist("plan", str(tmp_path), "--nodes", str(nodes), "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["bits"] == 3 and doc["nodes"][0]["weight_bytes"] == file_bytes
