"""float16/bfloat16 weights on MLX's CPU backend run as float32 (float16 is ~30x slower
there): converted at load, said once on stderr, token-exact with mlx-lm on the same
weights cast to float32; on other backends the stored dtype stays."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from runtime_helpers import reference_tokens, run_cli, tiny_models  # noqa: F401 (fixture)

from mlxdist.runtime import stage as stage_mod
from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine
from mlxdist.runtime.stage import StageSpec, load_stage

PROMPT = list(b"The quick brown fox jumps over the lazy dog.")
NOTE = "weights run as float32 on MLX's CPU backend"

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="MLX's default device is not the CPU")


def cast_copy(src: Path, dst: Path, dtype: str) -> Path:
    """A copy of the mlx-lm directory SRC with every floating tensor cast to DTYPE (written
    with MLX's own safetensors writer, independent of the runtime's loader)."""
    shutil.copytree(src, dst)
    to = getattr(mx, dtype)
    for f in dst.glob("model*.safetensors"):
        tensors = {k: v.astype(to) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in mx.load(str(f)).items()}
        mx.save_safetensors(str(f), tensors, metadata={"format": "mlx"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}))
    return dst


def float_dtypes(model) -> set:
    return {v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}


@pytest.fixture(scope="module")
def half_models(tiny_models, tmp_path_factory):
    """(half, float32 copy of the half weights) for a float and a 4-bit model, in float16 and bfloat16."""
    root = tmp_path_factory.mktemp("half")
    out = {}
    for arch in ("llama", "llama_q4"):
        for dtype in ("float16", "bfloat16"):
            half = cast_copy(tiny_models[arch], root / f"{arch}-{dtype}", dtype)
            out[arch, dtype] = (half, cast_copy(half, root / f"{arch}-{dtype}-as-f32", "float32"))
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "llama_q4"])
def test_half_weights_load_as_float32_and_match_mlx_lm(half_models, arch, dtype, capfd, monkeypatch):
    half, as_f32 = half_models[arch, dtype]
    assert mx.load(str(next(half.glob("model*.safetensors"))))["model.norm.weight"].dtype == getattr(mx, dtype)
    monkeypatch.setattr(stage_mod, "_upcast_noted", False)
    n = json.loads((half / "config.json").read_text())["num_hidden_layers"]
    st = load_stage(half, StageSpec(0, n, n))
    assert float_dtypes(st.model) == {mx.float32}  # norms, embeddings, and the 4-bit layers' scales/biases
    if arch == "llama_q4":
        q_proj = st.model.model.layers[0].self_attn.q_proj
        assert q_proj.weight.dtype == mx.uint32 and q_proj.scales.dtype == q_proj.biases.dtype == mx.float32
    err = capfd.readouterr().err
    assert err.count(NOTE) == 1 and f"{dtype} weights run as float32" in err
    load_stage(half, StageSpec(0, 2, n))  # said once per process
    assert NOTE not in capfd.readouterr().err
    with open_engine(half) as eng:  # quantized matmuls take the float32 scales and biases
        assert eng.generate(PROMPT, max_tokens=12) == reference_tokens(as_f32, PROMPT, 12)


def test_other_backends_keep_float16(half_models, monkeypatch):
    """Metal and CUDA run float16 well: there nothing is converted (the check is the only
    backend-specific thing, patched here to what a GPU answers)."""
    monkeypatch.setattr(stage_mod, "computes_half_as_float32", lambda: False)
    st = load_stage(half_models["llama_q4", "float16"][0], StageSpec(0, 4, 4))
    assert float_dtypes(st.model) == {mx.float16}


def test_cli_says_so_once_and_ranks_match(half_models, tiny_models):
    """`mlxdist run` over 2 worker processes (whose stderr goes to their logs): the note is
    printed once by the command, and the answer is mlx-lm's on the float32 weights."""
    half, as_f32 = half_models["llama_q4", "float16"]
    with open_engine(as_f32) as eng:  # only for the chat template and the decoding
        prompt = eng.encode_chat([{"role": "user", "content": "hi"}])
        expected = eng.tokenizer.decode(reference_tokens(as_f32, list(prompt), 6))
    for ranks in ("2", "1"):
        r = run_cli("run", str(half), "--ranks", ranks, "-p", "hi", "-m", "6")
        assert (r.returncode, r.stdout.rstrip("\n")) == (0, expected), r.stderr
        assert r.stderr.splitlines() == [
            "mlxdist: note: float16 weights run as float32 on MLX's CPU backend, many times faster there "
            "(Metal and CUDA keep float16)"], r.stderr
    r = run_cli("run", str(tiny_models["llama_q4"]), "-p", "hi", "-m", "2")  # float32 already: nothing to say
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_expert_parallel_converts_after_dropping_other_ranks_experts(tiny_models, tmp_path):
    """Each rank keeps its experts first (prepare), then converts what it kept: a float16
    MoE over 2 expert-parallel ranks answers as mlx-lm on the float32 cast."""
    half = cast_copy(tiny_models["deepseek_v3"], tmp_path / "ds-f16", "float16")
    as_f32 = cast_copy(half, tmp_path / "ds-as-f32", "float32")
    with open_engine(half, EngineConfig(expert_parallel=True), ranks=2) as eng:
        assert eng.generate(PROMPT, max_tokens=8) == reference_tokens(as_f32, PROMPT, 8)
