"""The one real model: SmolLM2-135M-Instruct Q4_1 GGUF, converted into 2 stages, answers
a chat prompt in English through mlx_lm.generate; its tokenizer came from GGUF metadata."""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.slow

ENGLISH = {"the", "capital", "of", "france", "is", "paris", "a", "city", "and", "in", "it"}


def test_smollm2_answers_in_english(smollm2_mlx):
    import mlx_lm

    manifest = json.loads((smollm2_mlx / "manifest.json").read_text())
    assert [s["layers"] for s in manifest["stages"]] == [[0, 15], [15, 30]]
    model, tokenizer = mlx_lm.load(str(smollm2_mlx))
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) >= 3 and sum(w in ENGLISH for w in words) >= 3, text
    assert "paris" in words, text


def _llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py `permute`, applied to Q and K rows for its rope."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_smollm2_weights_equal_gguf_reference(smollm2_gguf, smollm2_mlx):
    """Independent reference: the `gguf` package's own reader and dequantizer (numpy)."""
    import mlx.core as mx
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(smollm2_gguf))
    raw = {t.name: t for t in reader.tensors}
    ours = mx.load(str(smollm2_mlx / "stages" / "0" / "weights.safetensors"))
    config = json.loads((smollm2_mlx / "config.json").read_text())

    def ours_float(path, bits=4):
        return np.array(mx.dequantize(ours[f"{path}.weight"], ours[f"{path}.scales"], ours[f"{path}.biases"],
                                      group_size=32, bits=bits))

    for gguf_name, path, heads in [("blk.3.attn_q", "model.layers.3.self_attn.q_proj", config["num_attention_heads"]),
                                   ("blk.3.attn_k", "model.layers.3.self_attn.k_proj", config["num_key_value_heads"]),
                                   ("blk.3.attn_v", "model.layers.3.self_attn.v_proj", None),
                                   ("blk.3.ffn_down", "model.layers.3.mlp.down_proj", None)]:
        t = raw[f"{gguf_name}.weight"]
        want = dequantize(t.data, t.tensor_type)
        got = ours_float(path)
        if heads:
            got = _llama_cpp_permute(got, heads)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=path)
    t = raw["token_embd.weight"]  # Q8_0 in this file: kept at 8 bits
    np.testing.assert_allclose(ours_float("model.embed_tokens", bits=8), dequantize(t.data, t.tensor_type),
                               rtol=0, atol=1e-6)
