"""Write miniature checkpoints in the official Hugging Face layouts, for tests and benches.

    python tools/make_checkpoint.py deepseek OUT_DIR   # DeepSeek-R1 style, FP8 e4m3 + block scales
    python tools/make_checkpoint.py llama OUT_DIR [--layers 4 --hidden 128 --intermediate 256]
    python tools/make_checkpoint.py qwen2|qwen3|qwen3_moe OUT_DIR [--layers 3]

Independent of the code under test: safetensors files are written here with numpy and
json following the published format, FP8 with ml_dtypes.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

BF16, F32 = ml_dtypes.bfloat16, np.float32
FP8 = ml_dtypes.float8_e4m3fn
ST_DTYPE = {np.dtype(BF16): "BF16", np.dtype(F32): "F32", np.dtype(FP8): "F8_E4M3", np.dtype(np.float16): "F16"}
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def save_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, pos = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": ST_DTYPE[a.dtype], "shape": list(a.shape), "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


def fp8_blocks(w: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's block FP8: per 128x128 block, scale = amax / 448 (e4m3's max)."""
    m, n = w.shape
    bm, bn = -(-m // block), -(-n // block)
    scale = np.zeros((bm, bn), F32)
    q = np.zeros((m, n), FP8)
    for i in range(bm):
        for j in range(bn):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = max(float(np.abs(blk).max()) / 448.0, 1e-12)
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).astype(FP8)
    return q, scale


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (no merges) with a chat template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[1],
        "chat_template": CHAT_TEMPLATE, "model_max_length": 4096}, indent=2))


def _dense(rng: np.random.Generator, out_dim: int, in_dim: int) -> np.ndarray:
    return (rng.standard_normal((out_dim, in_dim)) * (1.0 / np.sqrt(in_dim))).astype(F32)


def write_sharded(out: Path, tensors: dict[str, np.ndarray], files: int) -> None:
    names = list(tensors)
    per = -(-len(names) // files)
    weight_map, total = {}, 0
    for k in range(files):
        chunk = names[k * per:(k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        save_safetensors(out / fname, {n: tensors[n] for n in chunk})
        for n in chunk:
            weight_map[n] = fname
            total += tensors[n].nbytes
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def llama(out: Path, layers: int = 4, hidden: int = 128, intermediate: int = 256, vocab: int = 320,
          heads: int = 4, kv_heads: int = 2, tied: bool = False, seed: int = 0, files: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
        "bos_token_id": 256, "eos_token_id": 257, "hidden_act": "silu",
    }
    t: dict[str, np.ndarray] = {"model.embed_tokens.weight": (rng.standard_normal((vocab, hidden)) * 0.5).astype(BF16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(BF16)
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(BF16)
        for name, shape in [("self_attn.q_proj", (heads * head_dim, hidden)), ("self_attn.k_proj", (kv_heads * head_dim, hidden)),
                            ("self_attn.v_proj", (kv_heads * head_dim, hidden)), ("self_attn.o_proj", (hidden, heads * head_dim)),
                            ("mlp.gate_proj", (intermediate, hidden)), ("mlp.up_proj", (intermediate, hidden)),
                            ("mlp.down_proj", (hidden, intermediate))]:
            t[p + name + ".weight"] = _dense(rng, *shape).astype(BF16)
    t["model.norm.weight"] = np.ones(hidden, BF16)
    if not tied:
        t["lm_head.weight"] = _dense(rng, vocab, hidden).astype(BF16)
    write_sharded(out, t, files)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(out, vocab)
    return out


def deepseek(out: Path, seed: int = 0) -> Path:
    """DeepSeek-R1 in miniature: MLA attention, 3 dense layers then MoE layers with routed and
    shared experts, the MTP layer after the last layer, FP8 e4m3 weights with 128x128 block
    scales (hidden 192 and intermediate 320 leave partial blocks), bf16 elsewhere."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    c = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 320,
        "hidden_size": 192, "intermediate_size": 320, "moe_intermediate_size": 64, "num_hidden_layers": 5,
        "num_nextn_predict_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "n_shared_experts": 1, "n_routed_experts": 8, "routed_scaling_factor": 2.5, "kv_lora_rank": 64,
        "q_lora_rank": 96, "qk_rope_head_dim": 32, "v_head_dim": 64, "qk_nope_head_dim": 64,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "n_group": 2,
        "topk_group": 1, "num_experts_per_tok": 2, "moe_layer_freq": 1, "first_k_dense_replace": 3,
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000, "attention_bias": False,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 256, "eos_token_id": 257,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
    }
    H, D, I, MI = c["num_attention_heads"], c["hidden_size"], c["intermediate_size"], c["moe_intermediate_size"]
    t: dict[str, np.ndarray] = {}

    def fp8(name: str, out_dim: int, in_dim: int) -> None:
        q, s = fp8_blocks(_dense(rng, out_dim, in_dim))
        t[name + ".weight"], t[name + ".weight_scale_inv"] = q, s

    def norm(name: str, dim: int) -> None:
        t[name + ".weight"] = (1 + 0.1 * rng.standard_normal(dim)).astype(BF16)

    def layer(i: int) -> None:
        p = f"model.layers.{i}."
        norm(p + "input_layernorm", D)
        norm(p + "post_attention_layernorm", D)
        fp8(p + "self_attn.q_a_proj", c["q_lora_rank"], D)
        norm(p + "self_attn.q_a_layernorm", c["q_lora_rank"])
        fp8(p + "self_attn.q_b_proj", H * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"]), c["q_lora_rank"])
        fp8(p + "self_attn.kv_a_proj_with_mqa", c["kv_lora_rank"] + c["qk_rope_head_dim"], D)
        norm(p + "self_attn.kv_a_layernorm", c["kv_lora_rank"])
        fp8(p + "self_attn.kv_b_proj", H * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])
        fp8(p + "self_attn.o_proj", D, H * c["v_head_dim"])
        if i < c["first_k_dense_replace"]:
            fp8(p + "mlp.gate_proj", I, D)
            fp8(p + "mlp.up_proj", I, D)
            fp8(p + "mlp.down_proj", D, I)
            return
        t[p + "mlp.gate.weight"] = _dense(rng, c["n_routed_experts"], D).astype(BF16)
        t[p + "mlp.gate.e_score_correction_bias"] = (0.01 * rng.standard_normal(c["n_routed_experts"])).astype(F32)
        for e in range(c["n_routed_experts"]):
            fp8(p + f"mlp.experts.{e}.gate_proj", MI, D)
            fp8(p + f"mlp.experts.{e}.up_proj", MI, D)
            fp8(p + f"mlp.experts.{e}.down_proj", D, MI)
        S = MI * c["n_shared_experts"]
        fp8(p + "mlp.shared_experts.gate_proj", S, D)
        fp8(p + "mlp.shared_experts.up_proj", S, D)
        fp8(p + "mlp.shared_experts.down_proj", D, S)

    t["model.embed_tokens.weight"] = (rng.standard_normal((c["vocab_size"], D)) * 0.5).astype(BF16)
    for i in range(c["num_hidden_layers"] + 1):  # the last one is the MTP layer
        layer(i)
    mtp = f"model.layers.{c['num_hidden_layers']}."
    t[mtp + "embed_tokens.weight"] = t["model.embed_tokens.weight"].copy()
    norm(mtp + "enorm", D)
    norm(mtp + "hnorm", D)
    fp8(mtp + "eh_proj", D, 2 * D)
    norm(mtp + "shared_head.norm", D)
    t[mtp + "shared_head.head.weight"] = _dense(rng, c["vocab_size"], D).astype(BF16)
    norm("model.norm", D)
    t["lm_head.weight"] = _dense(rng, c["vocab_size"], D).astype(BF16)
    write_sharded(out, t, 3)
    (out / "config.json").write_text(json.dumps(c, indent=2))
    write_tokenizer(out, c["vocab_size"])
    return out


QWEN_CONFIGS = {
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "head_dim": 32, "tie_word_embeddings": True},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "head_dim": 32, "num_experts": 4,
                  "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [0],
                  "moe_intermediate_size": 64, "norm_topk_prob": True, "tie_word_embeddings": False},
}


def qwen(out: Path, arch: str, layers: int = 3, seed: int = 0) -> Path:
    """A Qwen2/Qwen3/Qwen3-MoE checkpoint in Hugging Face layout (experts one by one as
    `mlp.experts.E.*_proj`), its tensor names and shapes taken from mlx-lm's model."""
    import importlib

    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_type": arch, "hidden_size": 128, "num_hidden_layers": layers, "intermediate_size": 256,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 320,
              "rope_theta": 10000.0, "max_position_embeddings": 2048, "torch_dtype": "bfloat16",
              "bos_token_id": 256, "eos_token_id": 257, **QWEN_CONFIGS[arch]}
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    shapes = {k: v.shape for k, v in tree_flatten(module.Model(module.ModelArgs.from_dict(config)).parameters())}
    t: dict[str, np.ndarray] = {}
    for name, shape in sorted(shapes.items()):
        if ".switch_mlp." in name:  # unstack: Hugging Face stores one tensor per expert
            prefix, proj = name.split(".switch_mlp.")
            for e in range(shape[0]):
                t[f"{prefix}.experts.{e}.{proj}"] = _dense(rng, *shape[1:]).astype(BF16)
        elif name.endswith("norm.weight"):
            t[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(BF16)
        elif name.endswith(".bias") or name == "model.embed_tokens.weight":
            t[name] = (0.5 * rng.standard_normal(shape)).astype(BF16)
        else:
            t[name] = _dense(rng, *shape).astype(BF16)
    write_sharded(out, t, 2)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(out, config["vocab_size"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["llama", "deepseek", *QWEN_CONFIGS])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--files", type=int, default=2)
    a = ap.parse_args()
    if a.kind == "llama":
        llama(a.out, a.layers, a.hidden, a.intermediate, tied=a.tied, files=a.files)
    elif a.kind == "deepseek":
        deepseek(a.out)
    else:
        qwen(a.out, a.kind, a.layers)
    print(a.out)


if __name__ == "__main__":
    main()
