"""Resumable writing of the stage files.

Each stage file is created once, with its final header and room for all its tensors
(`OUT/.partial/stage-<k>.safetensors`). A group's tensors are written at their offsets,
synced, and only then recorded in `OUT/.partial/done.jsonl`. A rerun with the same job
skips recorded groups and redoes the rest, writing the same bytes to the same places, so
the finished file is identical to one from an uninterrupted run. A torn last record (the
process died mid-line) is cut off.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from mlxdist.errors import UserError
from quantize.safetensors_io import Slot, layout, preallocate, to_bytes

PARTIAL = ".partial"


def disk_error(e: OSError, where: Path) -> UserError:
    if e.errno == errno.ENOSPC:
        return UserError(f"disk full while writing {where}; free space and rerun to resume")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write to {where}: {e.strerror}")
    return UserError(f"cannot write {where}: {e.strerror}")


class JobDir:
    """OUT/.partial: the job description, the stage files being filled, the done records."""

    def __init__(self, out: Path, job: dict[str, Any]):
        self.dir = out / PARTIAL
        self.records = self.dir / "done.jsonl"
        job_file = self.dir / "job.json"
        text = json.dumps(job, sort_keys=True, indent=1)
        try:
            if job_file.exists() and job_file.read_text() == text:
                self.done = self._load_records()
            else:
                if self.dir.exists():
                    shutil.rmtree(self.dir)
                self.dir.mkdir(parents=True)
                tmp = self.dir / "job.json.tmp"
                tmp.write_text(text)
                tmp.rename(job_file)
                self.done = {}
        except OSError as e:
            raise disk_error(e, self.dir) from None
        self.log = None

    def _load_records(self) -> dict[str, dict[str, Any]]:
        if not self.records.exists():
            return {}
        data = self.records.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]
        if len(keep) != len(data):  # torn last line from a kill mid-write
            with open(self.records, "r+b") as f:
                f.truncate(len(keep))
        done = {}
        for line in keep.splitlines():
            rec = json.loads(line)
            done[rec["id"]] = rec
        return done

    def record(self, recs: list[dict[str, Any]]) -> None:
        """Record groups whose data is already synced to disk."""
        if not recs:
            return
        if self.log is None:
            self.log = open(self.records, "ab")
        self.log.write(b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in recs))
        self.log.flush()
        os.fsync(self.log.fileno())
        for r in recs:
            self.done[r["id"]] = r

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


class StageFile:
    """One stage's safetensors file, with a fixed header, filled tensor by tensor."""

    def __init__(self, path: Path, slots: list[Slot]):
        self.path = path
        self.header, self.offsets = layout(slots)
        self.sizes = {s.name: s.nbytes for s in slots}
        self.total = sum(self.sizes.values())
        self.f = None

    def header_sha(self) -> str:
        return hashlib.sha256(self.header).hexdigest()

    def open(self) -> None:
        try:
            fresh = not self.path.exists() or self.path.stat().st_size != len(self.header) + self.total
            if not fresh:
                with open(self.path, "rb") as f:
                    fresh = f.read(len(self.header)) != self.header
            if fresh:
                preallocate(self.path, self.header, self.total)
            self.f = open(self.path, "r+b")
        except OSError as e:
            raise disk_error(e, self.path) from None

    def write_group(self, steps, hashes: dict[str, Any]) -> None:
        """Write the steps of one group: each step appends rows to its tensors."""
        cursor: dict[str, int] = {}
        try:
            for step in steps:
                for name, arr in step:
                    data = to_bytes(arr)
                    pos = cursor.get(name, 0)
                    if pos + len(data) > self.sizes[name]:
                        raise AssertionError(f"{name}: more data than its shape holds")
                    self.f.seek(self.offsets[name] + pos)
                    self.f.write(data)
                    cursor[name] = pos + len(data)
                    hashes.setdefault(name, hashlib.sha256()).update(data)
            for name, pos in cursor.items():
                if pos != self.sizes[name]:
                    raise AssertionError(f"{name}: wrote {pos} bytes, its shape holds {self.sizes[name]}")
        except OSError as e:
            raise disk_error(e, self.path) from None

    def sync(self) -> None:
        """Make what was written durable; only then may it be recorded as done."""
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            raise disk_error(e, self.path) from None

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
