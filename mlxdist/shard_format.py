"""The shard format of docs/shard-format.md as types: `manifest.json` (`Manifest`, with
its `StageEntry`, `Part` and `TensorEntry` records), a directory's `stage.json`
(`StageJson`), and the one safetensors header reader (`read_safetensors_header`).

The converter writes shards through these types and the runtime and the cluster read them
through them, so a manifest the documented format does not allow is refused in one place
(ValueError from `from_json`, one-line UserError from `load`). Base layer: standard
library and mlxdist.errors only, no MLX.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxdist.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAGE_JSON = "stage.json"
WEIGHTS = "weights.safetensors"
SOURCE_KINDS = ("tensors-sha256", "file-sha256")
# safetensors dtype name -> bytes per element
DTYPE_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1, "I8": 1, "U32": 4, "I32": 4,
               "I64": 8, "BOOL": 1}
MAX_HEADER = 100 * 1024 * 1024
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a node's part is a directory
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# -- safetensors ----------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: dtype (safetensors spelling), shape, and the
    absolute byte range [start, end) of its data in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: str | Path) -> dict[str, StoredTensor]:
    """The tensor table of a safetensors file (8-byte little-endian length, then JSON),
    checked against the file: known dtypes, sizes that match the shapes, data inside the
    file. Reads the header only. A bad file is a one-line UserError naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UserError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise UserError(f"{path}: truncated or corrupt safetensors header")
            header = json.loads(f.read(n))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header")
    header.pop("__metadata__", None)
    base, out = 8 + n, {}
    for name, h in header.items():
        try:
            dtype, shape, (a, b) = h["dtype"], tuple(int(d) for d in h["shape"]), h["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{path}: corrupt safetensors header (tensor {name})") from None
        if dtype not in DTYPE_SIZES:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        if b - a != _count(shape) * DTYPE_SIZES[dtype]:
            raise UserError(f"{path}: tensor {name} size disagrees with its shape")
        if base + b > size:
            raise UserError(f"{path}: truncated (tensor {name} runs past the end of the file)")
        out[name] = StoredTensor(name, dtype, shape, base + a, base + b)
    return out


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- manifest.json --------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorEntry:
    """`tensors[name]`: where a tensor is stored and what its bytes are. `stages` lists
    every stage holding a copy (the tied embedding: the first and the last)."""

    file: str  # relative to the shard root
    stage: int
    stages: tuple[int, ...]
    layer: int | None  # None for the embedding, the final norm and the head
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: U32, BF16, F16, F32
    nbytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "stage": self.stage, "stages": list(self.stages), "layer": self.layer,
                "shape": list(self.shape), "dtype": self.dtype, "bytes": self.nbytes, "sha256": self.sha256}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> TensorEntry:
        _keys(doc, where, ("file", "stage", "stages", "layer", "shape", "dtype", "bytes", "sha256"))
        layer = doc["layer"]
        t = cls(_str(doc["file"], where + ".file"), _int(doc["stage"], where + ".stage"),
                _ints(doc["stages"], where + ".stages"),
                None if layer is None else _int(layer, where + ".layer"),
                _ints(doc["shape"], where + ".shape"), _str(doc["dtype"], where + ".dtype"),
                _int(doc["bytes"], where + ".bytes"), _sha(doc["sha256"], where + ".sha256"))
        if t.stage not in t.stages:
            raise ValueError(f"{where}: stages {list(t.stages)} lack its own stage {t.stage}")
        if t.dtype not in DTYPE_SIZES:
            raise ValueError(f"{where}.dtype {t.dtype!r} is not a safetensors dtype")
        if t.nbytes != _count(t.shape) * DTYPE_SIZES[t.dtype]:
            raise ValueError(f"{where}.bytes {t.nbytes} disagrees with shape {list(t.shape)} of {t.dtype}")
        return t


@dataclass(frozen=True)
class Part:
    """One node's part of an expert-parallel stage: directory `stages/<k>/nodes/<node>/`
    holding that node's routed experts (rows in the order of `experts`) and everything
    every member needs; `tensors` are the part's own (same names in every part)."""

    node: str
    experts: tuple[int, ...]
    dir: str
    files: tuple[str, ...]
    nbytes: int
    tensors: dict[str, TensorEntry]

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "experts": list(self.experts), "dir": self.dir, "files": list(self.files),
                "bytes": self.nbytes, "tensors": {n: t.to_json() for n, t in self.tensors.items()}}

    @classmethod
    def from_json(cls, doc: Any, where: str, stage: int) -> Part:
        _keys(doc, where, ("node", "experts", "dir", "files", "bytes", "tensors"))
        node = _str(doc["node"], where + ".node")
        if not NODE_NAME.match(node):
            raise ValueError(f"{where}.node {node!r} cannot be a directory name")
        part = cls(node, _ints(doc["experts"], where + ".experts"), _str(doc["dir"], where + ".dir"),
                   _strs(doc["files"], where + ".files"), _int(doc["bytes"], where + ".bytes"),
                   _tensors(doc["tensors"], where + ".tensors"))
        if part.dir != part_dir(stage, node):
            raise ValueError(f"{where}.dir is {part.dir!r}, the format puts it at {part_dir(stage, node)!r}")
        _files_under(part.files, part.dir, where)
        for name, t in part.tensors.items():
            if t.file not in part.files or t.stages != (stage,):
                raise ValueError(f"{where}.tensors.{name} is not stored in this part")
        return part


@dataclass(frozen=True)
class StageEntry:
    """`stages[k]`: a layer range and its files. A pipeline stage is the directory
    `stages/<k>/`; an expert-parallel stage has `parts`, one per node, and its `files`
    and `bytes` are those of all its parts together."""

    stage: int
    layers: tuple[int, int]
    files: tuple[str, ...]
    nbytes: int
    parts: tuple[Part, ...] = ()

    @property
    def dir(self) -> str:
        return stage_dir(self.stage)

    def part(self, node: str) -> Part:
        for p in self.parts:
            if p.node == node:
                return p
        raise KeyError(f"stage {self.stage} has no part for node {node!r}")

    def to_json(self) -> dict[str, Any]:
        doc = {"stage": self.stage, "layers": list(self.layers), "files": list(self.files), "bytes": self.nbytes}
        if self.parts:
            doc["parts"] = [p.to_json() for p in self.parts]
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str) -> StageEntry:
        _keys(doc, where, ("stage", "layers", "files", "bytes"), ("parts",))
        k = _int(doc["stage"], where + ".stage")
        layers = _ints(doc["layers"], where + ".layers")
        if len(layers) != 2:
            raise ValueError(f"{where}.layers must be [start, end]")
        parts = ()
        if "parts" in doc:
            if not isinstance(doc["parts"], list) or len(doc["parts"]) < 2:
                raise ValueError(f"{where}.parts must list two or more nodes' parts")
            parts = tuple(Part.from_json(p, f"{where}.parts[{i}]", k) for i, p in enumerate(doc["parts"]))
            if len({p.node for p in parts}) != len(parts):
                raise ValueError(f"{where}.parts name a node twice")
        entry = cls(k, (layers[0], layers[1]), _strs(doc["files"], where + ".files"),
                    _int(doc["bytes"], where + ".bytes"), parts)
        _files_under(entry.files, entry.dir, where)
        if parts and sorted(entry.files) != sorted(f for p in parts for f in p.files):
            raise ValueError(f"{where}.files must be the files of its parts")
        return entry


@dataclass(frozen=True)
class SourceEntry:
    """`source`: what was converted and its checksum (docs/shard-format.md)."""

    path: str
    kind: str  # "tensors-sha256" or "file-sha256"
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "sha256": self.sha256}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> SourceEntry:
        _keys(doc, where, ("path", "kind", "sha256"))
        src = cls(_str(doc["path"], where + ".path"), _str(doc["kind"], where + ".kind"),
                  _sha(doc["sha256"], where + ".sha256"))
        if src.kind not in SOURCE_KINDS:
            raise ValueError(f"{where}.kind {src.kind!r} is not one of {', '.join(SOURCE_KINDS)}")
        return src


@dataclass(frozen=True)
class Manifest:
    """`OUT/manifest.json`: the conversion's source, options and config, its stages (layer
    ranges, files, parts) and every stored tensor of the pipeline stages (`tensors`;
    an expert-parallel stage's tensors are listed in its parts)."""

    source: SourceEntry
    options: dict[str, Any]
    config: dict[str, Any]
    stages: tuple[StageEntry, ...]
    tensors: dict[str, TensorEntry]

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "source": self.source.to_json(), "options": self.options,
                "config": self.config, "stages": [s.to_json() for s in self.stages],
                "tensors": {n: t.to_json() for n, t in self.tensors.items()}}

    @classmethod
    def from_json(cls, doc: Any) -> Manifest:
        """The manifest `doc` describes, or ValueError naming the first field the format
        does not allow."""
        _keys(doc, "manifest", ("format_version", "source", "options", "config", "stages", "tensors"))
        if doc["format_version"] != FORMAT_VERSION:
            raise ValueError(f"format_version is {doc['format_version']!r}, this mlxdist reads {FORMAT_VERSION}")
        for key in ("options", "config"):
            if not isinstance(doc[key], dict):
                raise ValueError(f"{key} must be an object")
        if not isinstance(doc["stages"], list) or not doc["stages"]:
            raise ValueError("stages must be a non-empty list")
        stages = tuple(StageEntry.from_json(s, f"stages[{i}]") for i, s in enumerate(doc["stages"]))
        end = 0
        for i, s in enumerate(stages):
            if s.stage != i or s.layers[0] != end or s.layers[1] <= end:
                raise ValueError(f"stages[{i}] must be stage {i} with layers [{end}, end > {end}]")
            end = s.layers[1]
        layers = doc["config"].get("num_hidden_layers")
        if isinstance(layers, int) and end != layers:
            raise ValueError(f"stages cover layers 0..{end}, config.json has {layers}")
        _check_parts(stages, doc["config"])
        m = cls(SourceEntry.from_json(doc["source"], "source"), doc["options"], doc["config"], stages,
                _tensors(doc["tensors"], "tensors"))
        for name, t in m.tensors.items():
            if any(not 0 <= k < len(stages) or stages[k].parts for k in t.stages) \
                    or t.file not in stages[t.stage].files:
                raise ValueError(f"tensors.{name}: stage {t.stage} (pipeline) does not hold file {t.file!r}")
        return m

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        """ROOT/manifest.json, or a one-line UserError saying why it cannot be used."""
        path = Path(root) / MANIFEST
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path} not found (not a finished `mlxdist quantize` output)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        except ValueError as e:
            raise UserError(f"{path} is not JSON: {e}") from None
        try:
            return cls.from_json(doc)
        except ValueError as e:
            raise UserError(f"{path} is not a format-{FORMAT_VERSION} manifest: {e}") from None

    def write(self, root: str | Path) -> None:
        """Write ROOT/manifest.json atomically (a temporary file renamed into place), with
        sorted keys: the same manifest gives the same bytes."""
        path = Path(root) / MANIFEST
        tmp = path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def stage_ranges(self) -> list[tuple[int, int]]:
        """Each stage's layer range [start, end), in stage order."""
        return [s.layers for s in self.stages]

    def stage_bytes(self, root: str | Path) -> list[int]:
        """Bytes on disk under each `stages/<k>/` directory of ROOT (all its files, the
        parts of an expert-parallel stage included)."""
        return [_tree_bytes(Path(root) / s.dir) for s in self.stages]

    def tensors_of(self, stage: int, node: str | None = None) -> dict[str, TensorEntry]:
        """The tensors stored in stage `stage`'s directory, or in `node`'s part of it when
        the stage is expert-parallel."""
        entry = self.stages[stage]
        if entry.parts:
            if node is None:
                raise KeyError(f"stage {stage} is expert-parallel: name the node whose part to read")
            return entry.part(node).tensors
        return {n: t for n, t in self.tensors.items() if stage in t.stages}


def _check_parts(stages: tuple[StageEntry, ...], config: dict[str, Any]) -> None:
    """At most one stage is expert-parallel (has parts): the only stage (whole-group expert
    parallelism), or, beside pipeline stages (a mixed plan's conversion), not the first,
    which the group's rank 0 runs alone. Its parts give each node some experts and each of
    the model's routed experts (config.json's n_routed_experts / num_experts) to exactly
    one node."""
    ep = [s.stage for s in stages if s.parts]
    if len(ep) > 1:
        raise ValueError(f"stages {', '.join(map(str, ep))} have parts: at most one stage is expert-parallel")
    if not ep:
        return
    k = ep[0]
    if k == 0 and len(stages) > 1:
        raise ValueError("stages[0] has parts: beside pipeline stages the expert-parallel stage comes after the "
                         "first stage, which rank 0 runs alone")
    ids = sorted(e for p in stages[k].parts for e in p.experts)
    declared = next((config[key] for key in ("n_routed_experts", "num_experts") if isinstance(config.get(key), int)),
                    None)
    n = declared if declared is not None else len(ids)
    if ids != list(range(n)) or not all(p.experts for p in stages[k].parts):
        raise ValueError(f"stages[{k}].parts must give each node some experts and each expert 0..{n - 1} to "
                         f"exactly one node")


# -- stage.json ---------------------------------------------------------------------------

@dataclass(frozen=True)
class StageJson:
    """A stage or part directory's `stage.json`: what it holds, so a node needs only its own
    directory. A part also names its node and its experts (rows in that order)."""

    stage: int
    num_stages: int
    layers: tuple[int, int]
    has_embedding: bool
    has_head: bool
    node: str | None = None
    experts: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {"format_version": FORMAT_VERSION, "stage": self.stage, "num_stages": self.num_stages,
               "layers": list(self.layers), "has_embedding": self.has_embedding, "has_head": self.has_head}
        if self.node is not None:
            doc.update(node=self.node, experts=list(self.experts or ()))
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str = STAGE_JSON) -> StageJson:
        part = isinstance(doc, dict) and "node" in doc
        _keys(doc, where, ("format_version", "stage", "num_stages", "layers", "has_embedding", "has_head")
              + (("node", "experts") if part else ()))
        if doc["format_version"] != FORMAT_VERSION:
            raise ValueError(f"{where}: format_version is {doc['format_version']!r}, this mlxdist reads "
                             f"{FORMAT_VERSION}")
        layers = _ints(doc["layers"], where + ".layers")
        if len(layers) != 2:
            raise ValueError(f"{where}.layers must be [start, end]")
        for key in ("has_embedding", "has_head"):
            if not isinstance(doc[key], bool):
                raise ValueError(f"{where}.{key} must be true or false")
        return cls(_int(doc["stage"], where + ".stage"), _int(doc["num_stages"], where + ".num_stages"),
                   (layers[0], layers[1]), doc["has_embedding"], doc["has_head"],
                   _str(doc["node"], where + ".node") if part else None,
                   _ints(doc["experts"], where + ".experts") if part else None)

    @classmethod
    def load(cls, directory: str | Path) -> StageJson:
        path = Path(directory) / STAGE_JSON
        try:
            return cls.from_json(json.loads(path.read_text()), str(path))
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: {getattr(e, 'strerror', None) or e}") from None


def stage_dir(stage: int) -> str:
    """A stage's directory, relative to the shard root."""
    return f"stages/{stage}"


def part_dir(stage: int, node: str) -> str:
    """A node's part of an expert-parallel stage, relative to the shard root."""
    return f"stages/{stage}/nodes/{node}"


def shard_root(directory: str | Path) -> Path | None:
    """OUT for a stage directory `OUT/stages/<k>` or a part `OUT/stages/<k>/nodes/<node>`,
    None for a directory elsewhere (a node's held copy)."""
    d = Path(directory)
    if d.parent.name == "stages":
        return d.parent.parent
    if d.parent.name == "nodes" and d.parent.parent.parent.name == "stages":
        return d.parent.parent.parent.parent
    return None


# -- checks ---------------------------------------------------------------------------------

def _keys(doc: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must be an object")
    missing = [k for k in required if k not in doc]
    extra = sorted(set(doc) - set(required) - set(optional))
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    if extra:
        raise ValueError(f"{where} has keys the format does not define: {', '.join(extra)}")


def _int(v: Any, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{where} must be a non-negative integer")
    return v


def _ints(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise ValueError(f"{where} must be a list of non-negative integers")
    return tuple(_int(x, where) for x in v)


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{where} must be a string")
    return v


def _strs(v: Any, where: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not v:
        raise ValueError(f"{where} must be a non-empty list of strings")
    return tuple(_str(x, where) for x in v)


def _sha(v: Any, where: str) -> str:
    if not isinstance(v, str) or not _SHA256.match(v):
        raise ValueError(f"{where} must be a hex sha256")
    return v


def _tensors(doc: Any, where: str) -> dict[str, TensorEntry]:
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must be an object {{name: entry}}")
    return {n: TensorEntry.from_json(t, f"{where}.{n}") for n, t in doc.items()}


def _files_under(files: tuple[str, ...], directory: str, where: str) -> None:
    for f in files:
        if not f.startswith(directory + "/") or ".." in f.split("/"):
            raise ValueError(f"{where}: file {f!r} is not in {directory}/")


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size
    return total
