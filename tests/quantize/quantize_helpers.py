"""Helpers shared by the quantize tests (a module of its own: `conftest` names clash
between test areas)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import make_checkpoint  # noqa: E402,F401


# Fixtures: imported by the test modules that use them (no conftest.py here: its module
# name would clash with other areas' conftest.py files).
@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint.llama(tmp_path_factory.mktemp("ckpt") / "llama")


@pytest.fixture(scope="session")
def llama_tied_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint.llama(tmp_path_factory.mktemp("ckpt") / "llama-tied", tied=True, layers=3)


@pytest.fixture(scope="session")
def deepseek_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint.deepseek(tmp_path_factory.mktemp("ckpt") / "deepseek")


@pytest.fixture(scope="session")
def deepseek_out(deepseek_ckpt, tmp_path_factory) -> Path:
    from quantize.convert import convert

    return convert(deepseek_ckpt, tmp_path_factory.mktemp("out") / "ds", stages=2, progress=False)


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "mlxdist", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def load_stage(stage_dir: Path) -> tuple[nn.Module, dict]:
    """An mlx-lm model built from the stage's config.json holding only the stage's weights,
    quantized the way mlx-lm's loader does (per-path entries, else where .scales exist)."""
    from mlx_lm.utils import _get_classes

    config = json.loads((stage_dir / "config.json").read_text())
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = mx.load(str(stage_dir / "weights.safetensors"))
    q = config["quantization"]

    def predicate(path: str, module: nn.Module):
        if path in q:
            return q[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(model, group_size=q["group_size"], bits=q["bits"], class_predicate=predicate)
    model.load_weights(list(weights.items()), strict=False)
    return model, json.loads((stage_dir / "stage.json").read_text())


def chained_logits(out: Path, tokens: mx.array) -> mx.array:
    """Run the stage directories one after another, each on its own layers, in one process."""
    from mlx_lm.models.base import create_attention_mask

    stages = sorted((out / "stages").iterdir(), key=lambda p: int(p.name))
    h = None
    for stage_dir in stages:
        model, stage = load_stage(stage_dir)
        inner = model.model
        if stage["has_embedding"] and stage["stage"] == 0:
            h = inner.embed_tokens(tokens)
        mask = create_attention_mask(h, None, return_array=True)
        start, end = stage["layers"]
        for layer in inner.layers[start:end]:
            h = layer(h, mask, None)
        if stage["has_head"]:
            h = inner.norm(h)
            head = getattr(model, "lm_head", None)
            return head(h) if head is not None else inner.embed_tokens.as_linear(h)
    raise AssertionError("no stage has the head")
