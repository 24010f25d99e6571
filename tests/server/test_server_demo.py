"""The README's main command: `mlxdist demo` converts SmolLM2, serves it on 2 local ranks
and prints the answer, which must be single-process mlx-lm's greedy answer on the same
converted weights; then it exits cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("mlxdist.runtime.engine", reason="the runtime engine is not merged yet")
pytest.importorskip("quantize.convert", reason="the converter is not merged yet")

QUESTION = "What is the capital of France?"
MAX_TOKENS = 10


def test_demo_answers_like_mlx_lm(smollm2_gguf, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / smollm2_gguf.name).symlink_to(smollm2_gguf)  # no second download
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLXDIST_CACHE=str(cache))
    r = subprocess.run([sys.executable, "-m", "mlxdist", "demo", QUESTION, "--max-tokens", str(MAX_TOKENS)],
                       env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in r.stderr
    converted = next(cache.glob("smollm2-135m-instruct-2stage*"))
    assert (converted / "manifest.json").exists()

    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(converted))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    want = "".join(x.text for x in stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS))
    assert want.strip() and r.stdout.strip() == want.strip()
