"""Reading and writing the safetensors format one tensor at a time.

The header is parsed by mlxdist's one reader (`mlxdist.shard_format`), so that we can
validate a checkpoint before reading any data, read exactly one tensor's bytes into
memory, and write a file whose header is known before its data (the output shapes are
computable from the input shapes), filling tensors in at their offsets in any order.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxdist.errors import UserError
from mlxdist.shard_format import read_safetensors_header

# safetensors dtype name -> (mlx dtype the bytes are viewed as, bytes per element)
DTYPES: dict[str, tuple[mx.Dtype, int]] = {
    "BF16": (mx.bfloat16, 2),
    "F16": (mx.float16, 2),
    "F32": (mx.float32, 4),
    "F8_E4M3": (mx.uint8, 1),  # decoded with mx.from_fp8
    "U8": (mx.uint8, 1),
    "I8": (mx.int8, 1),
    "U32": (mx.uint32, 4),
    "I32": (mx.int32, 4),
    "I64": (mx.int64, 8),
    "BOOL": (mx.bool_, 1),
}
MX_TO_ST: dict[mx.Dtype, str] = {
    mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint8: "U8",
    mx.int8: "I8", mx.uint32: "U32", mx.int32: "I32", mx.int64: "I64", mx.bool_: "BOOL",
}
# a same-width integer view numpy understands, for getting bytes out of mlx arrays
_RAW_VIEW = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}
_NP_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor table of a safetensors file, checked against the file's size (mlxdist's one
    header reader), each tensor located in `path`."""
    return {name: TensorInfo(name, path, t.dtype, t.shape, t.start, t.end)
            for name, t in read_safetensors_header(path).items()}


def read_raw(info: TensorInfo) -> tuple[np.ndarray, str]:
    """One tensor's bytes (and nothing else) and their sha256. No MLX here: safe on any
    thread (MLX arrays belong to the thread's stream that made them)."""
    width = DTYPES[info.dtype][1]
    buf = np.empty(info.nbytes // width, dtype=_NP_RAW[width])
    try:
        with open(info.file, "rb") as f:
            f.seek(info.start)
            got = f.readinto(memoryview(buf).cast("B"))
    except OSError as e:
        raise UserError(f"cannot read {info.file}: {e.strerror}") from None
    if got != info.nbytes:
        raise UserError(f"{info.file}: truncated while reading {info.name}")
    return buf, hashlib.sha256(memoryview(buf).cast("B")).hexdigest()


def as_array(info: TensorInfo, buf: np.ndarray) -> mx.array:
    arr = mx.array(buf)
    if arr.dtype != DTYPES[info.dtype][0]:
        arr = arr.view(DTYPES[info.dtype][0])
    return arr.reshape(info.shape)


def read_tensor(info: TensorInfo) -> mx.array:
    """One tensor, read into memory (and nothing else)."""
    return as_array(info, read_raw(info)[0])


def to_bytes(arr: mx.array) -> memoryview:
    """The row-major bytes of an mlx array (evaluated)."""
    raw = arr.view(_RAW_VIEW[arr.itemsize]) if arr.dtype in (mx.bfloat16, mx.float16) else arr
    view = memoryview(raw)  # no copy when mlx holds it row-major already
    if not view.c_contiguous:
        view = memoryview(mx.contiguous(raw))
    return view.cast("B")


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype][1]


def layout(slots: list[Slot]) -> tuple[bytes, dict[str, int]]:
    """Header bytes and absolute data offset per tensor, for tensors stored in this order."""
    header: dict[str, object] = {"__metadata__": {"format": "mlx"}}
    offsets, pos = {}, 0
    for s in slots:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        offsets[s.name] = pos
        pos += s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text)) % 8)  # data starts 8-byte aligned, as the format asks
    base = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {k: base + v for k, v in offsets.items()}


def preallocate(path: Path, header: bytes, total: int) -> None:
    """Create `path` holding `header` and room for `total` bytes of tensor data. The room
    is reserved now where the file system allows, so a full disk shows at the start."""
    with open(path, "wb") as f:
        f.write(header)
        f.flush()
        try:
            os.posix_fallocate(f.fileno(), 0, len(header) + total)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            f.truncate(len(header) + total)
        os.fsync(f.fileno())
