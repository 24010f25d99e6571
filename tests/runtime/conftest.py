"""Tiny random models for the runtime tests, written once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": make_tiny_model(root / "llama", "llama", layers=6),
        "deepseek_v3": make_tiny_model(root / "deepseek_v3", "deepseek_v3", layers=6),
        "qwen3": make_tiny_model(root / "qwen3", "qwen3", layers=4),
        "qwen3_moe": make_tiny_model(root / "qwen3_moe", "qwen3_moe", layers=4),
        "llama_q4": make_tiny_model(root / "llama_q4", "llama", layers=4, bits=4, seed=1),
    }
