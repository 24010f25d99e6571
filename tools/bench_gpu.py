"""DeepSeek-R1-shaped decode through mlx-lm and mlxdist on one and two GPUs, in one run.

    python tools/bench_gpu.py all [--workdir /tmp/r1bench] [--layers 6] [--tokens 48]
        [--gpus 2] [--concurrency 1,2,4,8,16] [--quick] [--model-dir DIR] [--profile]
        [--rows ours1,ours2,...] [--shared-gpu-row] [--warmup 2] [--row-timeout 900]

Runs on the lent GPU machine (MLX's CUDA build; two GPUs for the 2-rank rows) and prints
one JSON object (logs go to stderr). Every row is measured in this same run, on the same
weights:

    mlxlm_1gpu          mlx-lm generate_step on one GPU (the baseline every ratio divides by);
                        also the single-stream reference tokens of every batch prompt
    mlxlm_batch_1gpu    mlx-lm's continuous batching (BatchGenerator, the engine under
                        mlx_lm.generate.batch_generate and mlx_lm.server) at each B of
                        --concurrency, all B prompts inserted at once; beside each B its
                        `model_floor_ms_per_step`: mlx-lm's model alone in a bare loop
                        over merged batch caches, no scheduler (what a step costs at least)
    mlxdist_1rank       mlxdist's engine, one rank, on one GPU, single stream and B streams
    mlxdist_1rank_plain the same with mlx-lm's own quantized product calls
                        (MLXDIST_WIDE_PRODUCTS=0): what runtime/wide_products.py gains
    mlxdist_2rank_1gpu_messages  two ranks sharing GPU 0 (--gpus 1, or --shared-gpu-row)
    mlxdist_2rank       two ranks on two GPUs, ring messages per step (--handoff messages)
    mlxdist_2rank_nccl  two ranks on two GPUs, lock-step runs summing over NCCL (--handoff nccl)
    mlxlm_pipe_2gpu     mlx-lm's own pipeline (sharded_load with a pipeline group), two GPUs

With `--gpus 1` (a one-GPU machine) the 2-rank messages row shares GPU 0 instead: it checks
the code path on CUDA, not the 2-GPU targets (NCCL refuses two ranks on one GPU, and the
workers refuse lock-step runs over the ring group on CUDA). `--quick` runs only mlx-lm's
single-stream reference, mlx-lm's batch rows and mlxdist's 1-rank rows (a short device
session). `--rows` runs only some of the rows after mlx-lm's two (always run, every ratio
needs them), to split a long run over several commands: the weights stay in --workdir.
`--model-dir DIR` skips `prepare` and uses an mlx-lm model directory instead (e.g. a tiny
model from tools/tiny_models.py, to smoke-test the rows on a CPU).

Batch rows (B concurrent streams, B from --concurrency; stream i's prompt is PROMPT with
its second token replaced, all 8 tokens long, stream 0's is PROMPT itself): `aggregate_tok_s`
is steady-state decode, prefill excluded: the window opens at the STEADY_SKIP-th token of
the last stream to start decoding and closes at the last token of the first stream to
finish, so every stream decodes throughout; it counts all streams' tokens inside the window
over its length. It is null when the window holds under MIN_WINDOW_TOKENS tokens per stream
(e.g. an engine that serves the streams one after the other); `span_tok_s` (all tokens after
each stream's first, over first token to last) is the fallback. mlx-lm's batch rows time
BatchGenerator's steps the same way (one step = one token of every stream) and also report
mlx-lm's own `BatchStats.generation_tps` (whole run, first token included, its prompt_time
excluded) as `mlxlm_generation_tps`. Stop tokens are off on mlx-lm's side (as generate_step),
so every stream decodes --tokens tokens. Each B is warmed up first (--warmup tokens per
stream, its shapes compiled). `ttft_p50_s`: submit to first token, median over the streams.

Every row reports its first greedy tokens (FIRST_TOKENS), compared with mlx-lm
generate_step's (`tokens_match_mlxlm`); for batch rows every stream's first tokens are
compared with generate_step's for that stream's prompt alone (`batch_tokens_match_mlxlm`:
per row and B, how many streams match, and where the others first differ).

Ratios (`ratios`), all within this run: `*_speed_vs_mlxlm_1gpu` (single stream, mlx-lm
ms / ours), `mlxdist_1rank_single_vs_mlxlm_generate_step`, `{row}_B{b}_vs_mlxlm_batch_B{b}`
(aggregate over mlx-lm BatchGenerator's at the same B), `mlxlm_batch_B{b}_vs_mlxlm_generate_step`,
`mlxdist_1rank_B{b}_vs_mlxdist_1rank_plain_B{b}` (wide products on against off),
`mlxdist_2rank_1gpu_messages_B8_vs_mlxdist_1rank_B8` (2 ranks sharing one GPU against 1
rank, both 8 streams), on 2 GPUs `mlxdist_2rank[_nccl]_B16_vs_mlxdist_1rank_B8` (16 streams
over two GPUs against 8 on one), and the older `{row}_{c}streams_aggregate_vs_mlxlm_1stream`.

The weights: `--layers` DeepSeek-R1 decoder layers at the real dimensions (hidden 7168,
MLA with kv_lora_rank 512, 256 routed experts of 2048 with 8 active, one shared expert; the
first layer dense as in R1's dense prefix) plus R1's 129280-token embedding and head, all
4-bit (group 64) except the router, random but seeded. They are written once, layer by
layer, to --workdir in mlx-lm's format (so each process reads them the same way), and the
rows run one after another in subprocesses so GPU memory never holds two copies.

Sub-commands (used by `all`; handy alone): prepare, mlxlm, mlxlm-batch, ours, mlxlm-pipe-rank,
handoff-rank, copybw.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

R1 = dict(
    model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_attention_heads=128, num_key_value_heads=128,
    n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512,
    q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
    topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, n_group=8, topk_group=4,
    num_experts_per_tok=8, moe_layer_freq=1, first_k_dense_replace=1,
    max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000, attention_bias=False,
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                  "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
)
PROMPT = [0, 17, 4242, 99, 1234, 5, 77, 31337]
FIRST_TOKENS = 16  # greedy tokens each row reports, to compare with mlx-lm's
# rows `all` runs besides mlx-lm's generate_step and batch rows (--rows picks some)
ROWS = ("copybw", "ours1", "ours1_plain", "ours2_1gpu", "handoff", "ours2", "ours2_nccl", "mlxlm_pipe")
STEADY_SKIP = 5  # batch rows: tokens of the last stream to start before the steady window opens
MIN_WINDOW_TOKENS = 4  # ... and the fewest tokens per stream the window must hold to count


def log(*a: object) -> None:
    print("[bench_gpu]", *a, file=sys.stderr, flush=True)


# -- weights -------------------------------------------------------------------------------
def write_tokenizer(out: Path, vocab: int) -> None:
    """A word-level tokenizer over `vocab` opaque tokens, so every id the model can emit
    decodes; the text itself does not matter here."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t0", "eos_token": "t1",
        "unk_token": "t2", "model_max_length": 163840}))


def prepare(workdir: Path, layers: int) -> Path:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import deepseek_v3

    out = workdir / f"r1-{layers}L-4bit"
    if (out / "model.safetensors.index.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(R1, num_hidden_layers=layers)
    mx.random.seed(0)
    model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(cfg))
    for layer in model.model.layers:  # the router starts at zero: give it real choices
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.weight = mx.random.normal(layer.mlp.gate.weight.shape) * 0.02
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.endswith("gate"))
    weight_map: dict[str, str] = {}

    def save(name: str, tensors: dict) -> None:
        mx.eval(tensors)
        mx.save_safetensors(str(out / name), tensors, metadata={"format": "mlx"})
        weight_map.update({k: name for k in tensors})

    params = dict(tree_flatten(model.parameters()))
    for i in range(layers):
        prefix = f"model.layers.{i}."
        save(f"model-layer{i:03d}.safetensors", {k: v for k, v in params.items() if k.startswith(prefix)})
        for k in [k for k in params if k.startswith(prefix)]:
            del params[k]
        model.model.layers[i] = None  # drop the evaluated layer: memory stays one layer deep
        log(f"prepared layer {i}")
    save("model-rest.safetensors", params)
    cfg["quantization"] = {"group_size": 64, "bits": 4}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    write_tokenizer(out, cfg["vocab_size"])
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def weight_bytes_per_token(model_dir: Path) -> dict[str, float]:
    """Bytes of weights one decode step reads: everything but the routed experts (whole),
    8/256 of each routed expert stack, one embedding row."""
    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text())
    active = cfg["num_experts_per_tok"] / cfg["n_routed_experts"]
    total = read = 0.0
    for f in sorted(model_dir.glob("model-*.safetensors")):
        with safe_open(str(f), "numpy") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                nbytes = n * {"U32": 4, "BF16": 2, "F16": 2, "F32": 4}.get(sl.get_dtype(), 4)
                total += nbytes
                if "switch_mlp" in k:
                    read += nbytes * active
                elif "embed_tokens" in k:
                    read += nbytes / cfg["vocab_size"]
                else:
                    read += nbytes
    return {"weights_gb": total / 1e9, "read_per_token_gb": read / 1e9}


# -- rows ----------------------------------------------------------------------------------
def vocab_size(model_dir: Path) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


def stream_prompts(k: int, vocab: int) -> list[list[int]]:
    """k distinct 8-token prompts: PROMPT with its second token replaced (stream 0's is
    PROMPT itself); ids are taken modulo `vocab` so that small test models take them too."""
    return [[(17 + 31 * i if j == 1 else t) % vocab for j, t in enumerate(PROMPT)] for i in range(k)]


def _steady_ms(stamps: list[float], skip: int) -> float:
    gaps = [b - a for a, b in zip(stamps[skip:], stamps[skip + 1:])]
    return statistics.median(gaps) * 1e3 if gaps else None


def steady_window(stamps: list[list[float]], skip: int = STEADY_SKIP) -> dict:
    """Aggregate decode tok/s of concurrent streams, prefill excluded: from the `skip`-th
    token of the last stream to start to the last token of the first stream to finish
    (every stream decodes throughout), all streams' tokens in that window / its length.
    None when the streams never all decode at once (e.g. an engine that runs them one after
    the other) or the window holds fewer than MIN_WINDOW_TOKENS tokens per stream; `span_tok_s`
    is then the fallback: every token after each stream's first,
    over the time from the first stream's first token to the last token of all."""
    started = [s for s in stamps if s]
    span = (max(s[-1] for s in started) - min(s[0] for s in started)) if started else 0.0
    out: dict = {"span_tok_s": sum(len(s) - 1 for s in started) / span if span > 0 else None}
    if not stamps or any(len(s) < skip + 2 for s in stamps):
        return {"aggregate_tok_s": None, "window_s": None, **out,
                "note": f"a stream produced fewer than {skip + 2} tokens: no steady window"}
    lo = max(s[skip] for s in stamps)
    hi = min(s[-1] for s in stamps)
    n = sum(sum(1 for x in s if lo < x <= hi) for s in stamps)
    out.update({"window_s": max(0.0, hi - lo), "window_tokens": n})
    if n < MIN_WINDOW_TOKENS * len(stamps):  # a window of a few bursts says little
        return {"aggregate_tok_s": None, **out,
                "note": f"steady window under {MIN_WINDOW_TOKENS} tokens per stream: no aggregate"}
    return {"aggregate_tok_s": n / (hi - lo), **out}


def row_mlxlm(model_dir: Path, tokens: int, refs: int = 1) -> dict:
    """generate_step on PROMPT (timed), then the first FIRST_TOKENS greedy tokens of each of
    the first `refs` stream prompts alone: the reference of every batch row's streams."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(model_dir))
    prompts = stream_prompts(max(refs, 1), vocab_size(model_dir))
    stamps, toks = [], []
    for tok, _ in generate_step(mx.array(prompts[0]), model, max_tokens=tokens):
        stamps.append(time.perf_counter())
        toks.append(int(tok))
    references = [toks[:FIRST_TOKENS]]
    for p in prompts[1:]:
        references.append([int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=FIRST_TOKENS)])
    return {"ms_per_token": _steady_ms(stamps, 5), "peak_gb": mx.get_peak_memory() / 1e9,
            "tokens": toks[:FIRST_TOKENS], "reference_tokens": references}


def batch_generator_streams(model, prompts: list[list[int]], tokens: int, skip: int = STEADY_SKIP) -> dict:
    """mlx-lm's continuous batching on `prompts` at once (BatchGenerator, as batch_generate
    and mlx_lm.server drive it; no stop tokens, so every stream decodes `tokens`): one
    timestamp per step, each step one token of every stream still decoding."""
    from mlx_lm.generate import BatchGenerator

    b = len(prompts)
    gen = BatchGenerator(model, max_tokens=tokens, completion_batch_size=max(32, b), prefill_batch_size=b)
    try:
        t0 = time.perf_counter()
        uids = gen.insert(prompts, [tokens] * b)
        toks: dict[int, list[int]] = {u: [] for u in uids}
        stamps: dict[int, list[float]] = {u: [] for u in uids}
        with gen.stats() as st:
            while responses := gen.next_generated():
                now = time.perf_counter()
                for r in responses:
                    toks[r.uid].append(int(r.token))
                    stamps[r.uid].append(now)
    finally:
        gen.close()
    out = steady_window([stamps[u] for u in uids], skip)
    steps = [m for m in (_steady_ms(stamps[u], skip) for u in uids) if m is not None]
    out.update({
        "ms_per_step": statistics.median(steps) if steps else None,
        "ttft_p50_s": statistics.median(stamps[u][0] - t0 for u in uids if stamps[u]),
        "mlxlm_generation_tps": st.generation_tps, "mlxlm_decode_tps": st.decode_tps,
        "tokens": [toks[u][:FIRST_TOKENS] for u in uids]})
    return out


def row_mlxlm_batch(model_dir: Path, tokens: int, concurrency: list[int], warmup: int = 2) -> dict:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(model_dir))
    prompts = stream_prompts(max(concurrency), vocab_size(model_dir))
    out: dict = {"streams": {}}
    for b in concurrency:
        if warmup:
            batch_generator_streams(model, prompts[:b], warmup, skip=0)
        out["streams"][str(b)] = batch_generator_streams(model, prompts[:b], tokens)
        out["streams"][str(b)]["model_floor_ms_per_step"] = model_floor_ms(model, prompts[:b], tokens)
        log(f"mlxlm batch B={b}: {out['streams'][str(b)]['aggregate_tok_s']} tok/s")
    out["peak_gb"] = mx.get_peak_memory() / 1e9
    return out


def model_floor_ms(model, prompts: list[list[int]], tokens: int, skip: int = STEADY_SKIP) -> float:
    """mlx-lm's model alone, no scheduler: the prompts prefilled one by one, their caches
    merged into batch caches (one row: the plain caches), then greedy steps in a bare loop
    with the next step queued before the current tokens are read. What any batching
    engine's decode step costs at least on these weights and this B."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    caches = []
    for p in prompts:
        c = make_prompt_cache(model)
        model(mx.array(p[:-1])[None], cache=c)
        mx.eval([x.state for x in c])
        caches.append(c)
    batch = caches[0] if len(caches) == 1 else [type(cs[0]).merge(list(cs)) for cs in zip(*caches)]
    step = lambda y: mx.argmax(model(y[:, None], cache=batch)[:, -1, :], axis=-1)  # noqa: E731
    nxt = step(mx.array([p[-1] for p in prompts]))
    mx.async_eval(nxt)
    stamps = []
    for _ in range(tokens):
        cur, nxt = nxt, step(nxt)
        mx.async_eval(nxt)
        cur.tolist()
        stamps.append(time.perf_counter())
    return _steady_ms(stamps, skip)


def run_streams(engine, prompts: list[list[int]], tokens: int, skip: int = STEADY_SKIP) -> dict:
    """len(prompts) concurrent requests on `engine`, one thread each, submitted together."""
    import threading

    from mlxdist.runtime.api import GenerationRequest

    k = len(prompts)
    stamps: list[list[float]] = [[] for _ in range(k)]
    toks: list[list[int]] = [[] for _ in range(k)]
    errors: list[str] = []
    t0 = time.perf_counter()

    def one(i: int) -> None:
        req = GenerationRequest(prompt_tokens=tuple(prompts[i]), max_tokens=tokens)
        for ev in engine.submit(req):
            if ev.error:
                errors.append(ev.error)
            if ev.token is not None:
                stamps[i].append(time.perf_counter())
                toks[i].append(int(ev.token))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    out = steady_window(stamps, skip)
    per_stream = [m for m in (_steady_ms(s, skip) for s in stamps) if m is not None]
    out.update({"ms_per_token": statistics.median(per_stream) if per_stream else None,
                "ttft_p50_s": statistics.median(s[0] - t0 for s in stamps if s),
                "tokens": [t[:FIRST_TOKENS] for t in toks]})
    return out


def row_ours(model_dir: Path, ranks: int, tokens: int, concurrency: list[int], handoff: str = "messages",
             gpus: int = 2, warmup: int = 2) -> dict:
    from mlxdist.runtime.config import EngineConfig
    from mlxdist.runtime.engine import open_engine
    from mlxdist.runtime.launcher import LocalLauncher

    prompts = stream_prompts(max(concurrency), vocab_size(model_dir))
    launcher = LocalLauncher(rank_env=lambda r: {"CUDA_VISIBLE_DEVICES": str(r % gpus)}) if ranks > 1 else None
    config = EngineConfig(max_concurrent=max(concurrency), handoff=handoff)
    t = time.perf_counter()
    with open_engine(model_dir, config, ranks=ranks, launcher=launcher) as engine:
        load_s = time.perf_counter() - t
        first = engine.generate(prompts[0], max_tokens=min(FIRST_TOKENS, tokens))  # also the warm-up
        out = {"load_s": load_s, "handoff": handoff, "tokens": first, "streams": {}}
        for k in concurrency:
            if warmup:
                run_streams(engine, prompts[:k], warmup, skip=0)
            out["streams"][str(k)] = run_streams(engine, prompts[:k], tokens)
            log(f"ours {ranks} rank(s) {handoff} B={k}: {out['streams'][str(k)]['aggregate_tok_s']} tok/s")
        out["ms_per_token"] = out["streams"].get("1", {}).get("ms_per_token")
        out["stats"] = engine.stats()
    return out


def profile_summary(d: Path) -> dict:
    """Medians per rank, from MLXDIST_PROFILE files: over decode messages (one token)
    waiting for the header, building and queueing the step, and (sync mode) compute; over
    lock-step ticks the rank computed in, blocking on the lagged control word and building."""
    out = {}
    for f in sorted(d.glob("rank*.tsv")):
        lines = [line.split("\t") for line in f.read_text().splitlines()]
        msgs = [[float(x) for x in r] for r in lines if r[0] == "2" and r[1] == "1"]
        ticks = [[float(x) for x in r] for r in lines if r[0] == "8" and r[1] == "1"]
        row: dict = {}
        if msgs:
            row = {name: statistics.median(r[i] for r in msgs) * 1e3
                   for i, name in ((2, "wait_ms"), (3, "build_ms"), (4, "compute_ms"))}
            row["messages"] = len(msgs)
        if ticks:
            row.update({"tick_wait_ms": statistics.median(r[2] for r in ticks) * 1e3,
                        "tick_build_ms": statistics.median(r[3] for r in ticks) * 1e3, "ticks": len(ticks)})
        if row:
            out[f.stem] = row
    return out


def mlxlm_pipe_rank(model_dir: Path, tokens: int) -> None:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import sharded_load

    group = mx.distributed.init(backend="ring", strict=True)
    model, _ = sharded_load(str(model_dir), pipeline_group=group)
    stamps = []
    prompt = stream_prompts(1, vocab_size(model_dir))[0]
    for _tok, _ in generate_step(mx.array(prompt), model, max_tokens=tokens):
        stamps.append(time.perf_counter())
    if group.rank() == 0:
        print(json.dumps({"ms_per_token": _steady_ms(stamps, 5)}), flush=True)


def handoff_rank(iters: int = 200) -> None:
    """One hidden state (1 x 7168 bf16, 14 KB) each way between two GPUs over the ring."""
    import mlx.core as mx

    g = mx.distributed.init(backend="ring", strict=True)
    r = g.rank()
    h = mx.random.normal((1, 1, 7168)).astype(mx.bfloat16)
    mx.eval(h)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        if r == 0:
            mx.eval(mx.distributed.send(h, 1, group=g))
            h = mx.distributed.recv_like(h, 1, group=g)
            mx.eval(h)
        else:
            h = mx.distributed.recv_like(h, 0, group=g)
            mx.eval(h)
            mx.eval(mx.distributed.send(h, 0, group=g))
        times.append(time.perf_counter() - t)
    if r == 0:
        print(json.dumps({"round_trip_us": statistics.median(times[20:]) * 1e6}), flush=True)


def copy_bandwidth() -> dict:
    import mlx.core as mx

    x = mx.random.uniform(shape=(1 << 30,)).astype(mx.bfloat16)  # 2 GB
    mx.eval(x)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        y = x + 0  # one read and one write of every byte
        mx.eval(y)
        best = min(best, time.perf_counter() - t)
        del y
    return {"copy_gb_s": 2 * x.nbytes / best / 1e9}


# -- orchestration -------------------------------------------------------------------------
def _sub(args: list[str], env: dict | None = None, timeout: float = 900) -> dict:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    try:
        p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                           env=full_env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {timeout:.0f} s: {str(e.stderr or '')[-300:]}"}
    sys.stderr.write(p.stderr[-3000:])
    if p.returncode != 0:
        return {"error": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:] }"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _two_ranks(args: list[str], timeout: float = 900) -> dict:
    from mlxdist.runtime.launcher import free_port

    hostfile = Path("/tmp/bench_gpu_hosts.json")
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MLX_HOSTFILE=str(hostfile))
    procs = [subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(env, MLX_RANK=str(r), CUDA_VISIBLE_DEVICES=str(r)))
             for r in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate())
    sys.stderr.write(outs[0][1][-2000:])
    lines = outs[0][0].strip().splitlines()
    return json.loads(lines[-1]) if lines else {"error": outs[0][1].strip().splitlines()[-1:]}


def match_tokens(rows: dict[str, dict], refs: list[list[int]], n: int) -> dict:
    """Each batch row's streams against generate_step's tokens for the same prompt alone:
    per row and B, how many streams' first `n` tokens match and where the others differ.
    The per-stream token lists leave the rows here (the JSON would be mostly tokens)."""
    out: dict = {}
    for name, row in rows.items():
        for b, st in row.get("streams", {}).items():
            streams = st.pop("tokens", None)
            if streams is None:
                continue
            differ = {}
            for i, got in enumerate(streams):
                want = refs[i][:n] if i < len(refs) else None
                if want is None or got[:n] != want:
                    differ[str(i)] = (None if want is None else
                                      next((j for j, (x, y) in enumerate(zip(got, want)) if x != y),
                                           min(len(got), len(want))))
            out.setdefault(name, {})[b] = {"match": len(streams) - len(differ), "of": len(streams),
                                           "first_mismatch": differ}
    return out


def ratios_of(res: dict, ours: list[str], concurrency: list[int]) -> dict:
    base = res["mlxlm_1gpu"].get("ms_per_token")
    ratios: dict = {}

    def agg(row: str, b: int) -> float | None:
        return (res.get(row, {}).get("streams", {}).get(str(b)) or {}).get("aggregate_tok_s")

    for k in (*ours, "mlxlm_pipe_2gpu"):
        ms = res.get(k, {}).get("ms_per_token")
        if ms and base:
            ratios[f"{k}_speed_vs_mlxlm_1gpu"] = base / ms
    if "mlxdist_1rank_speed_vs_mlxlm_1gpu" in ratios:
        ratios["mlxdist_1rank_single_vs_mlxlm_generate_step"] = ratios["mlxdist_1rank_speed_vs_mlxlm_1gpu"]
    for b in concurrency:
        theirs = agg("mlxlm_batch_1gpu", b)
        if theirs and base:
            ratios[f"mlxlm_batch_B{b}_vs_mlxlm_generate_step"] = theirs * base / 1e3
        for k in ours:
            mine = agg(k, b)
            if mine and theirs:
                ratios[f"{k}_B{b}_vs_mlxlm_batch_B{b}"] = mine / theirs
        wide, plain = agg("mlxdist_1rank", b), agg("mlxdist_1rank_plain", b)
        if wide and plain:
            ratios[f"mlxdist_1rank_B{b}_vs_mlxdist_1rank_plain_B{b}"] = wide / plain
    one8 = agg("mlxdist_1rank", 8)
    for k, b in (("mlxdist_2rank_1gpu_messages", 8), ("mlxdist_2rank", 16), ("mlxdist_2rank_nccl", 16)):
        mine = agg(k, b)
        if mine and one8:
            ratios[f"{k}_B{b}_vs_mlxdist_1rank_B8"] = mine / one8
    for k in ours:  # the older rows: B streams' aggregate against one mlx-lm stream
        for c, row in res.get(k, {}).get("streams", {}).items():
            if row.get("aggregate_tok_s") and base:
                ratios[f"{k}_{c}streams_aggregate_vs_mlxlm_1stream"] = row["aggregate_tok_s"] * base / 1e3
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Rows, options and ratios: see the module docstring (head tools/bench_gpu.py).")
    ap.add_argument("cmd", help="all, or one row: prepare, mlxlm, mlxlm-batch, ours, mlxlm-pipe-rank, "
                                "handoff-rank, copybw")
    ap.add_argument("--workdir", default="/tmp/r1bench")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=48, help="tokens each stream decodes")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--concurrency", default="1,2,4,8,16", help="B values of the batch rows (streams at once)")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--handoff", default="messages", help="ours: messages, collective or nccl")
    ap.add_argument("--profile", action="store_true", help="all: add the MLXDIST_PROFILE rows (messages)")
    ap.add_argument("--quick", action="store_true",
                    help="all: only mlx-lm's reference, mlx-lm's batch rows and mlxdist's 1-rank rows")
    ap.add_argument("--model-dir", default=None,
                    help="an mlx-lm model directory to use instead of preparing R1-shaped weights "
                         "(e.g. tools/tiny_models.py's, to smoke-test on a CPU)")
    ap.add_argument("--shared-gpu-row", action="store_true",
                    help="all with --gpus 2: also run 2 ranks sharing GPU 0 (always run with --gpus 1)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="batch rows: tokens per stream of the warm-up run before each B (0: none)")
    ap.add_argument("--refs", type=int, default=0, help="mlxlm: reference prompts (default: max concurrency)")
    ap.add_argument("--rows", default=None,
                    help=f"all: only these rows besides mlx-lm's (always run), comma-separated from "
                         f"{','.join(ROWS)} (default: all that fit --gpus)")
    ap.add_argument("--row-timeout", type=float, default=900, help="all: seconds each row's subprocess may take")
    a = ap.parse_args()
    workdir = Path(a.workdir)
    model_dir = Path(a.model_dir) if a.model_dir else workdir / f"r1-{a.layers}L-4bit"
    conc = [int(c) for c in a.concurrency.split(",")]
    if a.cmd == "prepare":
        print(json.dumps({"dir": str(prepare(workdir, a.layers))}))
    elif a.cmd == "mlxlm":
        print(json.dumps(row_mlxlm(model_dir, a.tokens, a.refs or max(conc))))
    elif a.cmd == "mlxlm-batch":
        print(json.dumps(row_mlxlm_batch(model_dir, a.tokens, conc, a.warmup)))
    elif a.cmd == "ours":
        print(json.dumps(row_ours(model_dir, a.ranks, a.tokens, conc, a.handoff, a.gpus, a.warmup)))
    elif a.cmd == "mlxlm-pipe-rank":
        mlxlm_pipe_rank(model_dir, a.tokens)
    elif a.cmd == "handoff-rank":
        handoff_rank()
    elif a.cmd == "copybw":
        print(json.dumps(copy_bandwidth()))
    elif a.cmd == "all":
        import mlx.core as mx

        t0 = time.perf_counter()
        res: dict = {"device": str(mx.default_device()), "layers": a.layers, "tokens": a.tokens,
                     "concurrency": conc, "quick": a.quick, "gpus": a.gpus}
        one = {"CUDA_VISIBLE_DEVICES": "0"}
        rows = set(a.rows.split(",")) if a.rows else set(ROWS)
        if rows - set(ROWS):
            raise SystemExit(f"unknown rows {sorted(rows - set(ROWS))}: pick from {','.join(ROWS)}")
        if a.quick:
            rows &= {"ours1"}
        if a.gpus < 2:
            rows -= {"handoff", "ours2", "ours2_nccl", "mlxlm_pipe"}
        elif not a.shared_gpu_row and not a.rows:
            rows -= {"ours2_1gpu"}
        res["rows"] = sorted(rows)
        base = ["--workdir", a.workdir, "--layers", str(a.layers), "--tokens", str(a.tokens),
                "--warmup", str(a.warmup)]
        if a.model_dir:
            base += ["--model-dir", str(model_dir)]
            res["model_dir"] = str(model_dir)
            res["layers"] = json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers")
        else:
            log("prepare"); res["prepare"] = _sub(["prepare", *base], one, a.row_timeout)
            res.update(weight_bytes_per_token(model_dir))
            if "copybw" in rows:
                log("copybw"); res["copy"] = _sub(["copybw"], one, a.row_timeout)
        common = [*base, "--concurrency", a.concurrency]

        def sub(name: str, args: list[str], env: dict | None = None) -> dict:
            log(name)
            t = time.perf_counter()
            out = _sub(args, env, a.row_timeout)
            out["row_wall_s"] = time.perf_counter() - t
            return out

        res["mlxlm_1gpu"] = sub("mlxlm", ["mlxlm", *common], one)
        res["mlxlm_batch_1gpu"] = sub("mlxlm batch", ["mlxlm-batch", *common], one)
        if "ours1" in rows:
            res["mlxdist_1rank"] = sub("ours 1", ["ours", *common, "--ranks", "1"], one)
        if "ours1_plain" in rows:  # the A/B of runtime/wide_products.py, same weights, same run
            res["mlxdist_1rank_plain"] = sub("ours 1 plain", ["ours", *common, "--ranks", "1"],
                                             {**one, "MLXDIST_WIDE_PRODUCTS": "0"})
        two = ["ours", *common, "--ranks", "2"]
        if "ours2_1gpu" in rows:  # the code path on CUDA, both ranks on GPU 0 (not the 2-GPU targets)
            res["mlxdist_2rank_1gpu_messages"] = sub("ours 2 on 1 GPU", [*two, "--gpus", "1"], one)
        two += ["--gpus", str(a.gpus)]
        if "handoff" in rows:
            log("handoff"); res["handoff"] = _two_ranks(["handoff-rank"])
        if "ours2" in rows:
            res["mlxdist_2rank"] = sub("ours 2", two)
        if "ours2_nccl" in rows:
            res["mlxdist_2rank_nccl"] = sub("ours 2 nccl", [*two, "--handoff", "nccl"])
        # where the time goes (--profile, 2 GPUs): one decode step per stage, timestamps
        # only, then with a sync after each stage's compute; then the NCCL runs' ticks
        variants = (("profile", {}, "messages"), ("profile_sync", {"MLXDIST_PROFILE_SYNC": "1"}, "messages"),
                    ("nccl_profile", {}, "nccl"))
        for variant, env, handoff in variants if a.profile and a.gpus >= 2 and not a.quick else ():
            vdir = Path(a.workdir) / "profile" / variant
            vdir.mkdir(parents=True, exist_ok=True)
            for f in vdir.glob("*.tsv"):
                f.unlink()
            row = sub(f"ours 2 {variant}", ["ours", *base, "--concurrency", "1", "--ranks", "2",
                                            "--gpus", str(a.gpus), "--handoff", handoff],
                      {"MLXDIST_PROFILE": str(vdir), **env})
            row["profile"] = profile_summary(vdir)
            res[f"mlxdist_2rank_{variant}"] = row
        if "mlxlm_pipe" in rows:
            log("mlxlm pipe"); res["mlxlm_pipe_2gpu"] = _two_ranks(["mlxlm-pipe-rank", *common])
        ours = [k for k in res if k.startswith("mlxdist_") and "profile" not in k]
        if res["mlxlm_1gpu"].get("ms_per_token"):
            bw = res.get("copy", {}).get("copy_gb_s")
            if bw and res.get("read_per_token_gb"):
                res["roofline_ms_per_token"] = res["read_per_token_gb"] / bw * 1e3
            want = res["mlxlm_1gpu"].get("tokens")
            res["tokens_match_mlxlm"] = {k: res[k].get("tokens") == want[:len(res[k]["tokens"])]
                                         for k in ours if "tokens" in res[k]}
        refs = res["mlxlm_1gpu"].pop("reference_tokens", None)
        if refs:
            res["batch_tokens_match_mlxlm"] = match_tokens(
                {k: res[k] for k in ("mlxlm_batch_1gpu", *ours) if k in res}, refs, min(FIRST_TOKENS, a.tokens))
        res["ratios"] = ratios_of(res, ours, conc)
        res["wall_s"] = time.perf_counter() - t0
        print(json.dumps(res, indent=1))
    else:
        raise SystemExit(f"unknown command {a.cmd}")


if __name__ == "__main__":
    main()
