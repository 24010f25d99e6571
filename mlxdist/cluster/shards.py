"""Stage directories on disk: file checksums (cached), the node's verified store, and the
receiving side of delivery (partial files that resume at their size, atomic commit).

Node data dir layout:
    shards/<model>/<stage>/        verified copies (+ .mlxdist-verified.json)
    incoming/<model>/<stage>/      partial files being received (+ .mlxdist-expected.json)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from mlxdist.files import sha256_file
from mlxdist.shard_format import MANIFEST, shard_root

VERIFIED = ".mlxdist-verified.json"
EXPECTED = ".mlxdist-expected.json"
MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_STAGE = 4096
MAX_FILES = 64


class ShardError(Exception):
    """A delivery request that cannot be honoured (bad name, offset, checksum...)."""


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str


def check_name(model: object, stage: object) -> tuple[str, int]:
    if not isinstance(model, str) or not MODEL_RE.match(model) or ".." in model:
        raise ShardError(f"bad model name {model!r}")
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage < MAX_STAGE:
        raise ShardError(f"bad stage {stage!r}")
    return model, stage


def check_files(files: object) -> dict[str, FileDigest]:
    if not isinstance(files, dict) or not 0 < len(files) <= MAX_FILES:
        raise ShardError("bad file list")
    out = {}
    for name, d in files.items():
        if not isinstance(name, str) or not FILE_RE.match(name):
            raise ShardError(f"bad file name {name!r}")
        if not isinstance(d, dict) or not isinstance(d.get("size"), int) or d["size"] < 0 \
                or not isinstance(d.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", d["sha256"]):
            raise ShardError(f"bad digest for {name}")
        out[name] = FileDigest(d["size"], d["sha256"])
    return out


def files_wire(files: dict[str, FileDigest]) -> dict[str, dict]:
    return {n: {"size": d.size, "sha256": d.sha256} for n, d in sorted(files.items())}


def stage_digest(files: dict[str, FileDigest]) -> str:
    return hashlib.sha256(json.dumps(files_wire(files), sort_keys=True).encode()).hexdigest()



_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so a 300 GB model is hashed
    once per process; `hash_cache_file` also keeps it across runs."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    digest = sha256_file(path)
    with _hash_lock:
        _hash_cache[key] = digest
    return digest




def stage_sources(stage_dir: Path) -> dict[str, Path]:
    """The files a node gets for a stage (or a node's part of an expert-parallel stage):
    the directory's regular files, plus the model's OUT/manifest.json so the worker can
    check the shard against it."""
    stage_dir = Path(stage_dir)
    if not (stage_dir / "stage.json").is_file():
        raise ShardError(f"{stage_dir} is not a stage directory (no stage.json)")
    files = {}
    for p in sorted(stage_dir.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if not FILE_RE.match(p.name):
            raise ShardError(f"file name {p.name!r} in {stage_dir} cannot be delivered")
        files[p.name] = p
    root = shard_root(stage_dir)
    if MANIFEST not in files and root is not None and (root / MANIFEST).is_file():
        files[MANIFEST] = root / MANIFEST
    return files


def stage_files(stage_dir: Path) -> dict[str, FileDigest]:
    return {n: FileDigest(p.stat().st_size, cached_sha256(p))
            for n, p in stage_sources(stage_dir).items()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardStore:
    """The node's shards. Thread-safe."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.shards = self.root / "shards"
        self.incoming = self.root / "incoming"
        self._lock = threading.RLock()

    def _verified(self, model: str, stage: int) -> dict | None:
        d = self.shards / model / str(stage)
        try:
            record = json.loads((d / VERIFIED).read_text())
            for name, f in record["files"].items():
                st = (d / name).stat()
                if st.st_size != f["size"] or st.st_mtime_ns != f["mtime_ns"]:
                    return None  # changed since verification: no longer trusted
            return record
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def inventory(self) -> list[dict]:
        """Verified stages held: [{model, stage, digest, bytes}], sorted."""
        out = []
        with self._lock:
            if not self.shards.is_dir():
                return out
            for mdir in sorted(self.shards.iterdir()):
                for sdir in sorted(mdir.iterdir()) if mdir.is_dir() else ():
                    if not sdir.name.isdigit():
                        continue
                    record = self._verified(mdir.name, int(sdir.name))
                    if record:
                        out.append({"model": mdir.name, "stage": int(sdir.name),
                                    "digest": record["digest"],
                                    "bytes": sum(f["size"] for f in record["files"].values())})
        return out

    def stage_dir(self, model: str, stage: int) -> Path | None:
        with self._lock:
            return self.shards / model / str(stage) if self._verified(model, stage) else None

    def state(self, model: str, stage: int, files: dict[str, FileDigest]) -> dict:
        """What the node has of this stage: complete, or the offsets to resume at."""
        digest = stage_digest(files)
        with self._lock:
            record = self._verified(model, stage)
            if record and record["digest"] == digest:
                return {"complete": True, "offsets": {}}
            inc = self.incoming / model / str(stage)
            expected = files_wire(files)
            try:
                same = json.loads((inc / EXPECTED).read_text()) == expected
            except (OSError, ValueError):
                same = False
            if not same:  # a different version or nothing yet: start afresh
                shutil.rmtree(inc, ignore_errors=True)
                inc.mkdir(parents=True)
                (inc / EXPECTED).write_text(json.dumps(expected))
            offsets = {}
            for name, d in files.items():
                p = inc / name
                size = p.stat().st_size if p.exists() else 0
                if size > d.size:
                    p.unlink()
                    size = 0
                offsets[name] = size
            return {"complete": False, "offsets": offsets}

    def _expected(self, model: str, stage: int) -> tuple[Path, dict[str, FileDigest]]:
        inc = self.incoming / model / str(stage)
        try:
            return inc, check_files(json.loads((inc / EXPECTED).read_text()))
        except (OSError, ValueError):
            raise ShardError("no delivery in progress for this stage; ask for its state first")

    def write_chunk(self, model: str, stage: int, name: str, offset: int, data: bytes) -> int:
        with self._lock:
            inc, files = self._expected(model, stage)
            if name not in files:
                raise ShardError(f"{name} is not part of this stage")
            p = inc / name
            size = p.stat().st_size if p.exists() else 0
            if not isinstance(offset, int) or offset != size:
                raise ShardError(f"offset {offset} for {name}, but the node has {size} bytes")
            if offset + len(data) > files[name].size:
                raise ShardError(f"chunk runs past the end of {name}")
            with open(p, "ab") as f:
                f.write(data)
            return offset + len(data)

    def commit(self, model: str, stage: int) -> dict:
        """Verify every file and move the stage into place in one rename."""
        with self._lock:
            inc, files = self._expected(model, stage)
            for name, d in files.items():
                p = inc / name
                if not p.exists() or p.stat().st_size != d.size:
                    raise ShardError(f"{name} is incomplete")
                if sha256_file(p) != d.sha256:
                    p.unlink()  # corrupt: resume will send it again
                    raise ShardError(f"{name} failed its sha256 check")
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
            (inc / EXPECTED).unlink()
            record = {"digest": stage_digest(files), "files": {
                n: {"size": d.size, "sha256": d.sha256, "mtime_ns": (inc / n).stat().st_mtime_ns}
                for n, d in files.items()}}
            tmp = inc / (VERIFIED + ".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(inc / VERIFIED)
            final = self.shards / model / str(stage)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                trash = self.root / "trash" / uuid.uuid4().hex
                trash.parent.mkdir(parents=True, exist_ok=True)
                final.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            inc.rename(final)
            _fsync_dir(final.parent)
            return {"model": model, "stage": stage, "digest": record["digest"]}

    def confine(self, path: str | Path) -> Path:
        """`path` (absolute, or relative to the data dir) with every symlink resolved, if
        it lies inside the data dir; else ShardError. A peer can make the node read
        nothing outside it (no `..`, no absolute path elsewhere, no symlink out)."""
        root = self.root.resolve()
        try:
            real = (root / path).resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise ShardError(f"{str(path)!r}: {e}") from None
        if real != root and root not in real.parents:
            raise ShardError(f"{str(path)!r} is outside this node's data dir {root}; "
                             f"shared models must be under it (e.g. {root / 'shared'})")
        return real

    def pull(self, model: str, stage: int, source: Path, files: dict[str, FileDigest],
             chunk: int = 4 << 20) -> dict:
        """Copy a stage from a directory in the data dir (an NFS/SMB mount there), resuming
        and verifying exactly as a pushed delivery. Every file read is confined to the
        data dir, links resolved."""
        source = self.confine(source)
        if not source.is_dir():
            raise ShardError(f"{str(source)!r} is not a directory this node can read")
        paths = {}
        for name in files:  # all of them checked before anything is read
            path = source / name
            if name == MANIFEST and not path.exists() and shard_root(source) is not None:
                path = shard_root(source) / MANIFEST  # OUT/stages/k[/nodes/<node>] -> OUT/manifest.json
            paths[name] = self.confine(path)
            if not paths[name].is_file():
                raise ShardError(f"{name} is not a file in {source}")
        state = self.state(model, stage, files)
        if state["complete"]:
            return {"model": model, "stage": stage, "copied": 0, "complete": True}
        copied = 0
        for name, offset in state["offsets"].items():
            with open(paths[name], "rb") as f:
                f.seek(offset)
                while offset < files[name].size:
                    data = f.read(min(chunk, files[name].size - offset))
                    if not data:
                        raise ShardError(f"{source / name} is shorter than expected")
                    offset = self.write_chunk(model, stage, name, offset, data)
                    copied += len(data)
        self.commit(model, stage)
        return {"model": model, "stage": stage, "copied": copied, "complete": True}
