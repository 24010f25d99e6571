"""Where the weights come from: a Hugging Face directory, a hub repo, or a GGUF file.

A source gives the model's config.json, a table of its tensors (name, shape, dtype) that
can be checked before any data is read, one tensor at a time on demand, and a way to
write its tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxdist.errors import UserError
from quantize.safetensors_io import TensorInfo, as_array, read_header, read_raw
from quantize.source_api import Source, SourceTensor

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON") from None


class HFSource:
    """A directory in Hugging Face layout: config.json and model*.safetensors."""

    native: dict[str, tuple[int, int]] = {}

    def __init__(self, path: Path):
        self.path = path
        self.config = _load_json(path / "config.json")
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = _load_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (path / f).is_file():
                    raise UserError(f"{index} names {f}, which is not in {path}")
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise UserError(f"no .safetensors files in {path}")
        self.infos: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(path / f).items():
                if name in self.infos:
                    raise UserError(f"tensor {name} appears in two files ({f} and {self.infos[name].file.name})")
                self.infos[name] = info
        if index.exists():
            missing = sorted(set(weight_map) - set(self.infos))
            if missing:
                raise UserError(f"{index} lists {missing[0]}, which no safetensors file holds")
        self.tensors = {
            n: SourceTensor(n, i.shape, i.dtype, i.nbytes) for n, i in sorted(self.infos.items())
        }
        self.hashes: dict[str, str] = {}  # sha256 of each source tensor read so far

    def read(self, name: str) -> mx.array:
        buf, digest = read_raw(self.infos[name])
        self.hashes[name] = digest  # the source checksum, computed on the one read
        return as_array(self.infos[name], buf)

    def write_tokenizer(self, dst: Path) -> None:
        found = False
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, dst / name)
                found = found or name.startswith("tokenizer")
        if not found:
            raise UserError(f"no tokenizer files (tokenizer.json or tokenizer.model) in {self.path}")

    def fingerprint(self) -> dict[str, Any]:
        return {
            "path": str(self.path.resolve()),
            "files": {i.file.name: [i.file.stat().st_size, i.file.stat().st_mtime_ns] for i in self.infos.values()},
        }


def open_source(src: str) -> Source:
    """SRC as the user gave it: a directory, a .gguf file, or a hub repo id."""
    path = Path(src).expanduser()
    if path.is_dir():
        return HFSource(path)
    if path.is_file():
        if path.suffix == ".gguf":
            from quantize.gguf_source import GGUFSource

            return GGUFSource(path)
        raise UserError(f"{src}: expected a directory, a .gguf file or a hub repo id")
    if src.count("/") == 1 and not src.startswith((".", "/", "~")):
        return HFSource(fetch_from_hub(src))
    raise UserError(f"{src} does not exist")


def fetch_from_hub(repo: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise UserError(f"hub repo {repo} not found (or it is private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise UserError(f"cannot fetch hub repo {repo}: offline and not in the local cache") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(f"cannot fetch hub repo {repo}: {str(e).splitlines()[0]}") from None

