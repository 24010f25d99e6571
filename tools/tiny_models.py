"""Write tiny random models in mlx-lm's own directory format, for tests and benchmarks.

    python tools/tiny_models.py OUT_DIR [--arch llama|qwen3|qwen3_moe|deepseek_v3]
        [--layers N] [--hidden H] [--bits 4] [--seed S]

The weights are random (seeded), the tokenizer is a byte-level BPE over the 256 bytes plus
three special tokens and a chat template, so no download is needed. Quantization goes
through mlx-lm's own `quantize_model`, saving through its `save_model`/`save_config`, so
`mlx_lm.load(OUT_DIR)` reads the result as any mlx-lm model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

VOCAB = 259  # 256 bytes + <s> </s> <pad>
BOS, EOS, PAD = 256, 257, 258

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_config(arch: str, layers: int = 6, hidden: int = 64) -> dict[str, Any]:
    common = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
    }
    if arch == "llama":
        return common
    if arch == "qwen3":
        return {**common, "head_dim": hidden // 4, "tie_word_embeddings": True}
    if arch == "qwen3_moe":
        return {
            **common, "head_dim": hidden // 4, "num_experts": 4, "num_experts_per_tok": 2,
            "decoder_sparse_step": 1, "mlp_only_layers": [0], "moe_intermediate_size": hidden,
            "norm_topk_prob": True,
        }
    if arch == "deepseek_v3":
        return {
            **common, "num_key_value_heads": 4, "moe_intermediate_size": hidden // 2,
            "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": 48,
            "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_nope_head_dim": 16,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
            "n_group": 2, "topk_group": 1, "moe_layer_freq": 1,
            "first_k_dense_replace": min(2, layers - 1),
        }
    raise ValueError(f"unknown arch {arch!r}")


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(byte_chars, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    vocab.update({"<s>": BOS, "</s>": EOS, "<pad>": PAD})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def _byte_of(char: str) -> int:
    # GPT-2's byte-to-unicode table: printable bytes map to themselves, others to 256+.
    table = {}
    n = 0
    for b in range(256):
        if ord("!") <= b <= ord("~") or ord("¡") <= b <= ord("¬") or ord("®") <= b <= ord("ÿ"):
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table[char]


def make_tiny_model(
    out: str | Path, arch: str = "llama", layers: int = 6, hidden: int = 64,
    bits: int | None = None, group_size: int = 32, seed: int = 0, overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random `arch` model to `out` (an mlx-lm model directory) and return it.
    `overrides`: config entries to change (e.g. head sizes that a 4-bit group divides)."""
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {**tiny_config(arch, layers, hidden), **(overrides or {})}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Default inits give tiny logits; scale so that greedy decoding is not one token.
    params = tree_map(lambda p: p * 4.0 if p.ndim == 2 and p.shape[0] == VOCAB else p,
                      model.parameters())
    model.update(params)
    mx.eval(model.parameters())
    if bits:
        model, config = quantize_model(model, config, group_size, bits)
    save_model(out, model, donate_model=True)
    save_config(config, out / "config.json")
    write_tokenizer(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen3", "qwen3_moe", "deepseek_v3"])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    path = make_tiny_model(a.out, a.arch, a.layers, a.hidden, a.bits, seed=a.seed)
    n = sum(v.size for _, v in tree_flatten(mx.load(str(next(path.glob("model*.safetensors"))))))
    print(json.dumps({"path": str(path), "arch": a.arch, "parameters": n}))


if __name__ == "__main__":
    main()
