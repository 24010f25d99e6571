"""One pipeline stage: an mlx-lm model cut down to a layer range, with only that range's
weights loaded.

We do not re-implement any architecture. The stage keeps mlx-lm's own model object with
its `model.layers` list replaced by the stage's layers; on a stage that is not the first
the embedding becomes a pass-through (the input *is* the hidden state), on a stage that is
not the last the final norm becomes the identity and the head is dropped. Calling the
inner model then runs exactly mlx-lm's code for this range (its masks, its layer call
signature, its caches), which is what keeps the output token-exact with one process.
"""

from __future__ import annotations

import glob
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlxdist.errors import UserError, plural
from mlxdist.runtime.wide_products import reads_weights_per_row, widen
from mlxdist.shard_format import read_safetensors_header

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class StageSpec:
    """Which part of the model this process runs. `end` is exclusive. `head`: whether the
    model's last stage keeps the final norm and the head; False for a member of an
    expert-parallel last stage that does not sample (mixed.py): it runs the layers only."""

    start: int
    end: int
    num_layers: int
    head: bool = True

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        """Runs the final norm and the head (and samples)."""
        return self.end == self.num_layers and self.head


class _Passthrough(nn.Module):
    """Stands in for the embedding on later stages; keeps the real one only when the last
    stage needs it as a tied head."""

    def __init__(self, tied_head: nn.Module | None = None):
        super().__init__()
        if tied_head is not None:
            self.tied_head = tied_head

    def __call__(self, x: mx.array) -> mx.array:
        return x

    def as_linear(self, x: mx.array) -> mx.array:
        return self.tied_head.as_linear(x)


def _keep_tensor(name: str, spec: StageSpec, tied: bool) -> bool:
    m = LAYER_KEY.match(name)
    if m:
        return spec.start <= int(m.group(1)) < spec.end
    if name.startswith("model.embed_tokens."):
        return spec.is_first or (spec.is_last and tied)
    if name.startswith("lm_head.") or name.startswith("model.norm."):
        return spec.is_last
    return spec.is_first or spec.is_last  # anything else global: keep where it may be used


def _to_local(name: str, spec: StageSpec) -> str:
    m = LAYER_KEY.match(name)
    if m:
        return f"model.layers.{int(m.group(1)) - spec.start}.{m.group(2)}"
    if not spec.is_first and name.startswith("model.embed_tokens."):
        return "model.embed_tokens.tied_head." + name[len("model.embed_tokens."):]
    return name


# MLX's CPU backend runs half-precision matmuls far slower than float32, quantized ones
# above all (4-bit, 2 x86 cores: float16 ~25x, bfloat16 ~5x; SmolLM2-135M decoded 0.1
# tok/s with float16 scales and norms, 5.7 with float32): there a stage computes in
# float32. Metal and CUDA keep the stored dtype.
HALF_DTYPES = {mx.float16: "float16", mx.bfloat16: "bfloat16"}
_HALF_HEADER_DTYPES = {"F16": "float16", "BF16": "bfloat16"}
_upcast_noted = False


def computes_half_as_float32() -> bool:
    """True when MLX's default device is the CPU: float16/bfloat16 weights run as float32."""
    return mx.default_device() == mx.cpu


def note_float32_upcast(dtypes: set[str]) -> None:
    """Say once per process, in one line on stderr, that `dtypes` weights run as float32."""
    global _upcast_noted
    if _upcast_noted or not dtypes:
        return
    _upcast_noted = True
    names = " and ".join(sorted(dtypes))
    print(f"mlxdist: note: {names} weights run as float32 on MLX's CPU backend, many times "
          f"faster there (Metal and CUDA keep {names})", file=sys.stderr, flush=True)


def stored_half_dtypes(model_dir: str | Path) -> set[str]:
    """float16/bfloat16 among the tensors of MODEL_DIR's safetensors files (an mlx-lm
    directory or a shard directory), read from their headers only."""
    model_dir = Path(model_dir)
    found: set[str] = set()
    for f in weight_files(model_dir) or sorted(glob.glob(str(model_dir / "stages" / "**" / "*.safetensors"),
                                                         recursive=True)):
        try:
            header = read_safetensors_header(f)
        except UserError:
            continue
        found |= {_HALF_HEADER_DTYPES[t.dtype] for t in header.values() if t.dtype in _HALF_HEADER_DTYPES}
    return found


def note_if_upcast(model_dir: str | Path) -> None:
    """What the CLI calls before it starts worker processes (whose stderr goes to their
    logs): the same one-line note load_stage prints in-process."""
    if computes_half_as_float32():
        note_float32_upcast(stored_half_dtypes(model_dir))


def _upcast_half(model: nn.Module) -> set[str]:
    """The model's float16/bfloat16 parameters -> float32 (lazily: nothing is read here), on
    the CPU backend only; returns the dtypes converted."""
    from mlx.utils import tree_map

    if not computes_half_as_float32():
        return set()
    seen: set[str] = set()

    def cast(v: Any) -> Any:
        if isinstance(v, mx.array) and v.dtype in HALF_DTYPES:
            seen.add(HALF_DTYPES[v.dtype])
            return v.astype(mx.float32)
        return v

    model.update(tree_map(cast, model.parameters()))
    return seen


def read_config(model_dir: Path) -> dict[str, Any]:
    with open(model_dir / "config.json") as f:
        return json.load(f)


def weight_files(model_dir: Path) -> list[str]:
    files = sorted(glob.glob(str(model_dir / "model*.safetensors")))
    if not files:
        files = sorted(glob.glob(str(model_dir / "*.safetensors")))
    return files


class LoadedStage:
    """A loaded layer range. `forward` takes token ids [1, n] on the first stage or a
    hidden state [1, n, D] on the others, and returns hidden states, or logits [1, n, V]
    on the last stage when `logits=True`."""

    def __init__(self, model: nn.Module, spec: StageSpec, config: dict[str, Any]):
        self.model = model
        self.spec = spec
        self.config = config

    def make_cache(self) -> list[Any]:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def forward(self, x: mx.array, cache: list[Any], logits: bool = False) -> mx.array:
        if logits:
            return self.model(x, cache=cache)
        return self.model.model(x, cache=cache)


def _restrict(model: nn.Module, spec: StageSpec, tied: bool) -> None:
    inner = model.model
    inner.layers = inner.layers[spec.start:spec.end]
    if hasattr(inner, "pipeline_size"):  # mlx-lm's PipelineMixin: one stage, all kept layers
        inner.start_idx, inner.end_idx, inner.pipeline_size, inner.pipeline_rank = 0, None, 1, 0
    if hasattr(inner, "num_hidden_layers"):
        inner.num_hidden_layers = len(inner.layers)
    if not spec.is_first:
        inner.embed_tokens = _Passthrough(inner.embed_tokens if (spec.is_last and tied) else None)
    if not spec.is_last:
        inner.norm = nn.Identity()
        if "lm_head" in model:
            model.pop("lm_head")


def _part_tensors(parts: Sequence[Path]) -> dict[str, mx.array]:
    """Several parts of one expert-parallel stage as one (lazily): each stacked routed
    expert tensor (`switch_mlp`'s weight/scales/biases, expert axis first) the parts'
    concatenated in part order, every other tensor the first part's (identical in all)."""
    loaded = [{k: v for f in weight_files(Path(d)) for k, v in mx.load(f).items()} for d in parts]
    return {name: mx.concatenate([w[name] for w in loaded], axis=0) if ".switch_mlp." in name else v
            for name, v in loaded[0].items()}


def load_stage(model_dir: str | Path, spec: StageSpec, files: list[str] | None = None,
               presanitized: bool = False, prepare: Callable[[nn.Module], Any] | None = None,
               parts: Sequence[Path] = ()) -> LoadedStage:
    """Build the model from config.json, drop every layer outside `spec`, and load only
    the stage's tensors (lazily, straight from the safetensors files). `prepare(model)`
    runs before anything is read (expert parallel drops other ranks' experts there).
    `parts`: several parts of an expert-parallel stage to load as one (model_dir the
    first), their routed experts stacked in part order.
    On MLX's CPU backend float16/bfloat16 tensors are loaded as float32 (see
    computes_half_as_float32); on Metal and CUDA they keep their dtype."""
    from mlx_lm.utils import _get_classes, infer_quant_config

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    if config["num_hidden_layers"] != spec.num_layers:
        raise ValueError(f"config has {plural(config['num_hidden_layers'], 'layer')}, plan says {spec.num_layers}")
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    tied = "lm_head" not in model
    _restrict(model, spec, tied)

    # lazy: nothing is read until evaluated
    stored = _part_tensors(parts) if parts else {
        name: value for f in (files if files is not None else weight_files(model_dir))
        for name, value in mx.load(f).items()}
    weights = {name: value for name, value in stored.items()
               if _keep_tensor(name, spec, tied) or (not presanitized and not LAYER_KEY.match(name))}
    if not presanitized and hasattr(model, "sanitize"):
        weights = model.sanitize(weights)  # mlx-lm's own renames; they use args, not layers
    weights = {_to_local(k, spec): v for k, v in weights.items() if _keep_tensor(k, spec, tied)}

    if (q := config.get("quantization")) is not None:
        def predicate(path: str, module: nn.Module) -> Any:
            if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
                return False
            return infer_quant_config(path, module, weights)

        nn.quantize(model, group_size=q["group_size"], bits=q["bits"],
                    mode=q.get("mode", "affine"), class_predicate=predicate)
    model.eval()
    model.load_weights(list(weights.items()), strict=False)
    _check_loaded(model, weights)
    if prepare is not None:
        prepare(model)
    # after prepare: expert parallel has cut the stacked experts, so only what stays is converted
    note_float32_upcast(_upcast_half(model))  # CPU backend only: norms, embeddings, scales, biases
    if reads_weights_per_row():  # CUDA: a batch's rows as one matrix in every quantized product
        widen(model)
    mx.eval(model.parameters())
    return LoadedStage(model, spec, config)


def _check_loaded(model: nn.Module, weights: dict[str, mx.array]) -> None:
    from mlx.utils import tree_flatten

    expected = {k for k, _ in tree_flatten(model.parameters())}
    missing = sorted(expected - set(weights))
    if missing:
        raise ValueError(f"stage weights are missing {len(missing)} tensors, e.g. {missing[:3]}")
