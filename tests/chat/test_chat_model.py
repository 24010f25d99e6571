"""`mlxdist chat MODEL` with a real tiny model loaded in-process, questions from a pipe:
the answer printed is single-process mlx-lm's greedy answer, and the session keeps the
conversation (the second question is asked with the first exchange as history)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("mlxdist.runtime.engine", reason="the runtime engine is not merged yet")
MAX_TOKENS = 6


def test_chat_with_a_local_model(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    from tiny_models import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "tiny", arch="llama", layers=2, seed=5)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLXDIST_CHAT_HISTORY=str(tmp_path / "hist"))
    r = subprocess.run([sys.executable, "-m", "mlxdist", "chat", str(model_dir), "--temperature", "0",
                        "--max-tokens", str(MAX_TOKENS)], input="one\ntwo\n/stats\n", env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(model_dir))

    def answer(messages):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return "".join(x.text for x in stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS))

    first = answer([{"role": "user", "content": "one"}])
    second = answer([{"role": "user", "content": "one"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "two"}])
    assert f">>> {first}\n" in r.stdout
    assert f">>> {second}\n" in r.stdout
    assert "session: 2 answers" in r.stdout
