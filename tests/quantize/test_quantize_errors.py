"""Bad input: one line on stderr, a non-zero exit, and nothing that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess

import pytest
from quantize_helpers import deepseek_ckpt, llama_ckpt, run_cli  # noqa: F401 (fixtures)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")


def _fails(out, *args, env=None, match=""):
    r = run_cli("quantize", *args, str(out), "--quiet", env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, r.stderr
    assert len(lines) == 1 and lines[0].startswith("mlxdist: error: "), r.stderr
    assert match.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in r.stderr
    assert not (out / "manifest.json").exists()
    return lines[0]


@pytest.fixture
def ckpt(tmp_path, llama_ckpt):
    """A private copy of the tiny llama checkpoint, to break."""
    return shutil.copytree(llama_ckpt, tmp_path / "ckpt")


def test_nonexistent_src(tmp_path):
    _fails(tmp_path / "out", str(tmp_path / "nope"), match="does not exist")


def test_index_names_absent_file(ckpt, tmp_path):
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    _fails(tmp_path / "out", str(ckpt), match="model-00002-of-00002.safetensors")


def test_truncated_safetensors(ckpt, tmp_path):
    f = ckpt / "model-00002-of-00002.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    _fails(tmp_path / "out", str(ckpt), match="truncated")


def test_shape_disagrees_with_config(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 192
    (ckpt / "config.json").write_text(json.dumps(config))
    _fails(tmp_path / "out", str(ckpt), match="config.json implies")


def test_missing_layer(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (ckpt / "config.json").write_text(json.dumps(config))
    _fails(tmp_path / "out", str(ckpt), match="checkpoint lacks model.layers.4.")


def test_dtype_disagrees_with_config(deepseek_ckpt, tmp_path):
    ckpt = shutil.copytree(deepseek_ckpt, tmp_path / "ds")
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]  # FP8 tensors, but config.json says nothing of FP8
    (ckpt / "config.json").write_text(json.dumps(config))
    _fails(tmp_path / "out", str(ckpt), match="fp8")


def test_unsupported_architecture(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(config))
    _fails(tmp_path / "out", str(ckpt), match="unsupported architecture 'gpt2'")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    _fails(tmp_path / "out", str(bad), match="bad.gguf")


def test_bad_plan(llama_ckpt, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"stages": [{"layers": [0, 2]}, {"layers": [3, 4]}]}))
    _fails(tmp_path / "out", str(llama_ckpt), "--plan", str(plan), match="contiguous")


def test_hub_repo_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    _fails(tmp_path / "out", "mlxdist-test/no-such-model", env=env, match="mlxdist-test/no-such-model")


def test_out_under_a_file(llama_ckpt, tmp_path):
    (tmp_path / "file").write_text("")
    r = run_cli("quantize", str(llama_ckpt), str(tmp_path / "file" / "out"), "--quiet")
    assert r.returncode != 0 and r.stderr.startswith("mlxdist: error: ") and len(r.stderr.strip().splitlines()) == 1


@contextlib.contextmanager
def _tmpfs(path, options):
    """A tmpfs mounted at `path` for the block, unmounted after it."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@needs_root
def test_out_not_writable(llama_ckpt, tmp_path):
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as mnt:
        _fails(mnt / "out", str(llama_ckpt), match="cannot write")


@needs_root
def test_disk_full(llama_ckpt, tmp_path):
    with _tmpfs(tmp_path / "small", "size=256k") as mnt:
        _fails(mnt / "out", str(llama_ckpt), match="disk full")
        assert not (mnt / "out" / "stages").exists()


def test_missing_expert(deepseek_ckpt, tmp_path):
    ckpt = shutil.copytree(deepseek_ckpt, tmp_path / "ds")
    config = json.loads((ckpt / "config.json").read_text())
    config["n_routed_experts"] = 9  # the checkpoint holds 8
    (ckpt / "config.json").write_text(json.dumps(config))
    _fails(tmp_path / "out", str(ckpt), match="expert 8")


def test_hub_repo_from_local_cache(llama_ckpt, tmp_path):
    """A hub repo id resolves through huggingface-hub (here from its cache, offline)."""
    repo = tmp_path / "hf" / "hub" / "models--mlxdist-test--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(llama_ckpt, repo / "snapshots" / commit)
    r = run_cli("quantize", "mlxdist-test/tiny-llama", str(tmp_path / "out"), "--quiet",
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "manifest.json").exists()


def test_zero_stages_refused(llama_ckpt, tmp_path):
    """--stages 0 is no shorthand for the default of one stage: refused, on the command
    line (a usage error) and through the Python API alike."""
    line = _fails(tmp_path / "out", str(llama_ckpt), "--stages", "0", match="--stages")
    assert line.startswith("mlxdist: error: invalid value for '--stages': 0 is not in the range x>=1")
    from mlxdist.errors import UserError
    from quantize.convert import convert

    with pytest.raises(UserError, match="--stages must be between 1 and"):
        convert(llama_ckpt, tmp_path / "api-out", stages=0, progress=False)
    assert not (tmp_path / "api-out" / "manifest.json").exists()
