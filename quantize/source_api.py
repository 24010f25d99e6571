"""What every weight source gives (source.py: Hugging Face directories and hub repos;
gguf_source.py: GGUF files): the model's config, a table of its tensors that can be
checked before any data is read, one tensor at a time on demand, and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx


@dataclass(frozen=True)
class SourceTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    nbytes: int


class Source(Protocol):
    config: dict[str, Any]
    tensors: dict[str, SourceTensor]
    hashes: dict[str, str]  # sha256 of each tensor read since last cleared (HF sources)
    native: dict[str, tuple[int, int]]  # module -> (bits, group_size) of already-quantized weights

    def read(self, name: str) -> mx.array: ...
    def write_tokenizer(self, dst: Path) -> None: ...
    def fingerprint(self) -> dict[str, Any]: ...
