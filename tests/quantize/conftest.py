"""Checkpoints and helpers for the quantize tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from quantize_helpers import make_checkpoint


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
