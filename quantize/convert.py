"""`convert`: a checkpoint in, 4-bit MLX shards cut by stage out (docs/shard-format.md).

    OUT/.partial/        work in progress (job, stage files, done records, tokenizer)
    OUT/stages/<k>/      config.json, tokenizer files, stage.json, weights.safetensors
    OUT/stages/<k>/nodes/<node>/   the same, per node, for a plan's expert-parallel stage (the
                         whole model, or the one stage of a mixed plan; its other stages as above)
    OUT/model-*.safetensors -> stages/<k>/weights.safetensors, config.json, index (pipeline only)
    OUT/manifest.json    written last: its presence means the output is complete
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlxdist.errors import UserError
from mlxdist.shard_format import (
    FORMAT_VERSION, MANIFEST, STAGE_JSON, WEIGHTS, Manifest, Part, SourceEntry, StageEntry, StageJson, TensorEntry,
    part_dir, stage_dir,
)
from quantize.groups import COMPUTE_DTYPES, Group, Planner
from quantize.model_info import model_info
from quantize.produce import produce
from quantize.progress import Progress
from quantize.recipe import RECIPES
from quantize.safetensors_io import Slot
from quantize.source import open_source
from quantize.stages import Cut, check_expert_layers, even_ranges, read_plan, stage_of
from quantize.writer import JobDir, StageFile, disk_error

# seconds to pause after each group: lets the resume test kill a run part-way on any machine
SYNC_SECONDS = 5.0  # a crash loses at most this much work
THROTTLE = float(os.environ.get("MLXDIST_QUANTIZE_THROTTLE", "0") or 0)
VALID_BITS = (2, 3, 4, 5, 6, 8)
VALID_GROUP_SIZES = (32, 64, 128)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _check_out(out: Path, options: dict[str, Any]) -> bool:
    """True when OUT already holds this very conversion, finished."""
    if (out / MANIFEST).exists():
        if Manifest.load(out).options == options:
            shutil.rmtree(out / ".partial", ignore_errors=True)  # killed just after the manifest
            return True
        raise UserError(f"{out} holds a finished conversion with other settings; choose another OUT")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (out / ".partial").exists():
        raise UserError(f"{out} exists and is not empty; choose another OUT or remove it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise disk_error(e, out) from None
    return False


def _quant_config(groups: list[Group], bits: int, group_size: int, num_layers: int) -> dict[str, Any]:
    """mlx-lm's "quantization" entry: defaults plus one entry per module quantized otherwise."""
    q: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for g in groups:
        if g.layer is not None and g.layer >= num_layers:
            continue
        paths = [g.key] if g.kind in ("linear", "experts") else []
        if g.kind == "kv_b":
            attn = g.key[: -len(".kv_b_proj")]
            paths = [f"{attn}.embed_q", f"{attn}.unembed_out"]
        for path, spec in zip(paths, g.specs):
            if spec is not None and (spec.bits, spec.group_size) != (bits, group_size):
                q[path] = {"group_size": spec.group_size, "bits": spec.bits}
    return q


def convert(src: str | Path, out: str | Path, bits: int | None = None, group_size: int | None = None,
            recipe: str = "uniform", stages: int | None = None, plan: str | Path | None = None,
            keep_mtp: bool = False, progress: bool = True, dtype: str | None = None) -> Path:
    """Convert SRC (HF directory, .gguf file or hub repo id) into OUT; returns OUT.
    bits/group_size default to 4/64, or to a GGUF's own quantization (kept as is).
    dtype (bfloat16/float16/float32) is that of unquantized parameters and of scales:
    config.json's torch_dtype by default (float32 runs far faster on CPU backends)."""
    out = Path(out).expanduser()
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}")
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r} (choose from {', '.join(RECIPES)})")
    if plan is not None and stages is not None:
        raise UserError("give --stages or --plan, not both")
    source = open_source(str(src))
    keep_native = bits is None and group_size is None and bool(source.native)
    native = Counter(source.native.values()).most_common(1)[0][0] if source.native else (4, 64)
    bits = native[0] if bits is None else bits
    group_size = native[1] if group_size is None else group_size
    if bits not in VALID_BITS:
        raise UserError(f"--bits must be one of {', '.join(map(str, VALID_BITS))}")
    if group_size not in VALID_GROUP_SIZES:
        raise UserError(f"--group-size must be one of {', '.join(map(str, VALID_GROUP_SIZES))}")
    info = model_info(source.config)
    planner = Planner(source, info, bits, group_size, recipe, keep_mtp, keep_native, dtype)
    groups = planner.plan()
    L = info.num_layers
    if plan is not None:
        cuts = read_plan(Path(plan), L, info.num_experts)
        check_expert_layers(cuts, groups, str(plan))
    else:  # stages=0 is refused there, not taken for the default
        cuts = [Cut(r) for r in even_ranges(groups, L, 1 if stages is None else stages, info.tied)]
    options = {"bits": bits, "group_size": group_size, "recipe": recipe, "keep_mtp": keep_mtp, "dtype": dtype,
               "stages": [list(c.layers) for c in cuts], "source": str(src)}
    if any(c.parts for c in cuts):
        options["parts"] = [[[node, list(ids)] for node, ids in c.parts] for c in cuts]
    if _check_out(out, options):
        return out
    units = _units(planner, groups, cuts)

    job_dir = out / ".partial"
    files = [StageFile(job_dir / f"stage-{u.tag}.safetensors",
                       [Slot(o.name, o.dtype, o.shape) for g in u.groups for o in g.outs]) for u in units]
    job = {"format_version": FORMAT_VERSION, "options": options, "source": source.fingerprint(),
           "headers": [f.header_sha() for f in files]}
    jobs = JobDir(out, job)
    tokenizer_dir = jobs.dir / "tokenizer"
    try:
        if not tokenizer_dir.exists():  # first, so a missing tokenizer fails before hours of work
            tmp = jobs.dir / "tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            source.write_tokenizer(tmp)
            tmp.rename(tokenizer_dir)
    except OSError as e:
        raise disk_error(e, tokenizer_dir) from None

    bar = Progress(sum(len(g.outs) for u in units for g in u.groups),
                   sum(g.read_bytes for u in units for g in u.groups), enabled=progress)
    final = [out / u.dir / WEIGHTS for u in units]
    try:
        for u, f, dst in zip(units, files, final):
            if dst.exists() and not f.path.exists():  # moved into place by an earlier run
                bar.skip(sum(len(g.outs) for g in u.groups), sum(g.read_bytes for g in u.groups))
                continue
            f.open()
            pending: list[dict[str, Any]] = []  # done but not yet synced and recorded
            last_sync = time.monotonic()
            for g in u.groups:
                rid = f"{u.tag}:{g.key}"
                if rid in jobs.done:
                    bar.skip(len(g.outs), g.read_bytes)
                    continue
                source.hashes.clear()
                hashes: dict[str, Any] = {}
                f.write_group(produce(planner, g), hashes)
                pending.append({"id": rid, "out": {n: h.hexdigest() for n, h in hashes.items()},
                                "src": dict(source.hashes)})
                bar.advance(len(g.outs), g.read_bytes)
                if THROTTLE:
                    time.sleep(THROTTLE)
                if THROTTLE or time.monotonic() - last_sync > SYNC_SECONDS:
                    f.sync()  # one fsync per few seconds, not per tensor
                    jobs.record(pending)
                    pending, last_sync = [], time.monotonic()
            f.sync()
            jobs.record(pending)
            f.close()
        bar.close()
        _finish(out, source, info, groups, cuts, units, files, final, jobs, options)
    finally:
        for f in files:
            f.close()
        jobs.close()
    return out


@dataclass(frozen=True)
class Unit:
    """One output directory and the groups written into it: a pipeline stage, or one
    node's part of an expert-parallel stage (its routed experts only, `experts` in row
    order, plus everything every member of the stage needs)."""

    stage: int
    node: str | None
    experts: tuple[int, ...] | None
    groups: tuple[Group, ...]

    @property
    def dir(self) -> str:
        return stage_dir(self.stage) if self.node is None else part_dir(self.stage, self.node)

    @property
    def tag(self) -> str:
        """Names its partial file and its done records."""
        return str(self.stage) if self.node is None else f"{self.stage}-{self.node}"


def _units(planner: Planner, groups: list[Group], cuts: list[Cut]) -> list[Unit]:
    """The output directories, stage by stage, an expert-parallel stage's parts in the
    plan's node order."""
    L, N = planner.info.num_layers, len(cuts)
    ranges = [c.layers for c in cuts]
    per_stage: list[list[Group]] = [[] for _ in range(N)]
    for g in groups:
        ks = stage_of(g, ranges, L)
        if g.part == "embed" and planner.info.tied and N > 1:
            ks = [0, N - 1]  # the last stage uses the embedding as its head
        for k in ks:
            per_stage[k].append(g)
    units = []
    for k, c in enumerate(cuts):
        if not c.parts:
            units.append(Unit(k, None, None, tuple(per_stage[k])))
        for node, ids in c.parts:
            units.append(Unit(k, node, ids, tuple(planner.only_experts(g, ids) if g.kind == "experts" else g
                                                  for g in per_stage[k])))
    return units


def _finish(out: Path, source, info, groups, cuts, units, files, final, jobs, options) -> None:
    N, L = len(cuts), info.num_layers
    config = {k: v for k, v in source.config.items() if k not in ("quantization_config", "_name_or_path")}
    if options["dtype"]:
        config["torch_dtype"] = options["dtype"]
    config["quantization"] = _quant_config(groups, options["bits"], options["group_size"], L)
    config["quantization_config"] = config["quantization"]  # mlx-lm writes both
    tokenizer_dir = jobs.dir / "tokenizer"
    try:
        for u, f, dst in zip(units, files, final):
            k = u.stage
            dst.parent.mkdir(parents=True, exist_ok=True)
            for p in sorted(tokenizer_dir.iterdir()):
                shutil.copyfile(p, dst.parent / p.name)
            _write_json(dst.parent / "config.json", config)
            _write_json(dst.parent / STAGE_JSON, StageJson(
                k, N, cuts[k].layers, has_embedding=k == 0 or any(g.part == "embed" for g in u.groups),
                has_head=k == N - 1, node=u.node, experts=u.experts).to_json())
            if f.path.exists():
                os.replace(f.path, dst)
        for p in sorted(tokenizer_dir.iterdir()):
            shutil.copyfile(p, out / p.name)
        _write_json(out / "config.json", config)
        tensors, part_tensors, src_hashes = _tensor_entries(units, jobs.done)
        if not options.get("parts"):
            _write_links(out, tensors, N)
        stages = []
        for k, c in enumerate(cuts):
            mine = [(u, dst) for u, dst in zip(units, final) if u.stage == k]
            files_k = tuple(str(dst.relative_to(out)) for _, dst in mine)
            parts = tuple(Part(u.node, u.experts, u.dir, (str(dst.relative_to(out)),), dst.stat().st_size,
                               part_tensors[u.tag]) for u, dst in mine if u.node is not None)
            stages.append(StageEntry(k, c.layers, files_k, sum(dst.stat().st_size for _, dst in mine), parts))
        if hasattr(source, "sha256"):
            checksum = SourceEntry(str(options["source"]), "file-sha256", source.sha256())
        else:  # the tensors' bytes, as read: no second pass over a 700 GB checkpoint
            lines = "".join(f"{n} {h}\n" for n, h in sorted(src_hashes.items()))
            checksum = SourceEntry(str(options["source"]), "tensors-sha256",
                                   hashlib.sha256(lines.encode()).hexdigest())
        manifest = Manifest(checksum, options, config, tuple(stages), tensors)
        jobs.close()
        manifest.write(out)
        shutil.rmtree(jobs.dir)
    except OSError as e:
        raise disk_error(e, out) from None


def _tensor_entries(units: list[Unit], done: dict[str, dict[str, Any]]
                    ) -> tuple[dict[str, TensorEntry], dict[str, dict[str, TensorEntry]], dict[str, str]]:
    """The manifest's tensor entries from the done records: the pipeline stages' (a tied
    embedding copied onto the last stage is one entry with two stages), each part's (by
    unit tag), and every source tensor's sha256."""
    src_hashes: dict[str, str] = {}
    tensors: dict[str, TensorEntry] = {}
    part_tensors: dict[str, dict[str, TensorEntry]] = {}
    for u in units:
        table = tensors if u.node is None else part_tensors.setdefault(u.tag, {})
        for g in u.groups:
            rec = done[f"{u.tag}:{g.key}"]
            src_hashes.update(rec["src"])
            for o in g.outs:
                if o.name in table:  # the tied embedding, copied onto the last stage
                    table[o.name] = replace(table[o.name], stages=table[o.name].stages + (u.stage,))
                    continue
                table[o.name] = TensorEntry(f"{u.dir}/{WEIGHTS}", u.stage, (u.stage,), g.layer, tuple(o.shape),
                                            o.dtype, Slot(o.name, o.dtype, o.shape).nbytes, rec["out"][o.name])
    return tensors, part_tensors, src_hashes


def _write_links(out: Path, tensors: dict[str, TensorEntry], num_stages: int) -> None:
    """model-0000K-of-0000N.safetensors -> stages/K-1/weights.safetensors and the index,
    so that mlx_lm.load(OUT) reads a pipeline conversion as it is."""
    names = [f"model-{k + 1:05d}-of-{num_stages:05d}.safetensors" for k in range(num_stages)]
    for k, name in enumerate(names):
        link = out / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(stage_dir(k)) / WEIGHTS)
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {n: names[t.stage] for n, t in sorted(tensors.items())}})
