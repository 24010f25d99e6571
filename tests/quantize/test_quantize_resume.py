"""Killed with a real SIGKILL part-way (twice, and with a torn record), a rerun finishes
with output byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from quantize_helpers import ROOT, llama_ckpt  # noqa: F401 (fixture)

from quantize.convert import convert


def _start(src: Path, out: Path, throttle: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLXDIST_QUANTIZE_THROTTLE=throttle)
    return subprocess.Popen([sys.executable, "-m", "mlxdist", "quantize", str(src), str(out), "--stages", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_after(proc: subprocess.Popen, records: Path, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = records.read_bytes().count(b"\n") if records.exists() else 0
        if n >= at_least:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return n
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("conversion made no progress")


def _tree(root: Path) -> dict[str, bytes | str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def test_killed_twice_then_resumed_is_byte_identical(llama_ckpt, tmp_path):
    reference = convert(llama_ckpt, tmp_path / "ref", stages=2, progress=False)
    out = tmp_path / "out"
    records = out / ".partial" / "done.jsonl"

    done1 = _kill_after(_start(llama_ckpt, out, "0.05"), records, 6)
    assert not (out / "manifest.json").exists()
    with open(records, "ab") as f:  # as if killed while writing a record
        f.write(b'{"id": "1:model.la')
    done2 = _kill_after(_start(llama_ckpt, out, "0.05"), records, done1 + 10)
    assert done2 > done1 and not (out / "manifest.json").exists()

    proc = _start(llama_ckpt, out, "0")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert b"quantize:" in err  # plain progress lines when not on a terminal
    assert _tree(out) == _tree(reference)


def test_changed_settings_restart_the_partial_work(llama_ckpt, tmp_path):
    out = tmp_path / "out"
    _kill_after(_start(llama_ckpt, out, "0.05"), out / ".partial" / "done.jsonl", 3)
    convert(llama_ckpt, out, stages=1, progress=False)  # other settings: starts afresh
    assert _tree(out) == _tree(convert(llama_ckpt, tmp_path / "ref", stages=1, progress=False))


def test_interrupted_while_finishing(llama_ckpt, tmp_path, monkeypatch):
    """Stopped after the first stage file moved into place, then just before the manifest:
    each rerun finishes, byte-identical."""
    import quantize.convert as qc

    reference = convert(llama_ckpt, tmp_path / "ref", stages=2, progress=False)
    out = tmp_path / "out"
    real_replace, real_write = qc.os.replace, qc.Manifest.write

    def replace_once(a, b):
        if str(b).endswith("stages/1/weights.safetensors"):
            raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(qc.os, "replace", replace_once)
    try:
        convert(llama_ckpt, out, stages=2, progress=False)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(qc.os, "replace", real_replace)
    assert (out / "stages/0/weights.safetensors").exists() and not (out / "manifest.json").exists()

    def no_manifest(manifest, root):
        raise KeyboardInterrupt

    monkeypatch.setattr(qc.Manifest, "write", no_manifest)
    try:
        convert(llama_ckpt, out, stages=2, progress=False)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(qc.Manifest, "write", real_write)
    assert not (out / "manifest.json").exists()
    convert(llama_ckpt, out, stages=2, progress=False)
    assert _tree(out) == _tree(reference)
