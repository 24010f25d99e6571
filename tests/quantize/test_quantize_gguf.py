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
