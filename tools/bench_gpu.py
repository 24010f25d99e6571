"""DeepSeek-R1-shaped decode through mlx-lm and mlxdist on one and two GPUs, in one run.

    python tools/bench_gpu.py all [--workdir /tmp/r1bench] [--layers 6] [--tokens 48]

Runs on the lent GPU machine (MLX's CUDA build; two GPUs for the 2-rank rows) and prints
one JSON object. Every row is measured in this same run, on the same weights:

    mlxlm_1gpu          mlx-lm generate_step on one GPU (the baseline every ratio divides by)
    mlxdist_1rank       mlxdist's engine, one rank, on one GPU
    mlxdist_2rank       two ranks on two GPUs, ring messages per step (--handoff messages)
    mlxdist_2rank_nccl  two ranks on two GPUs, lock-step runs summing over NCCL (--handoff nccl)
    mlxlm_pipe_2gpu     mlx-lm's own pipeline (sharded_load with a pipeline group), two GPUs

With `--gpus 1` (a one-GPU machine) the 2-rank messages row shares GPU 0 instead: it checks
the code path on CUDA, not the 2-GPU targets (NCCL refuses two ranks on one GPU, and the
workers refuse lock-step runs over the ring group on CUDA). Every row also reports its
first greedy tokens, compared with mlx-lm's.

The weights: `--layers` DeepSeek-R1 decoder layers at the real dimensions (hidden 7168,
MLA with kv_lora_rank 512, 256 routed experts of 2048 with 8 active, one shared expert; the
first layer dense as in R1's dense prefix) plus R1's 129280-token embedding and head, all
4-bit (group 64) except the router, random but seeded. They are written once, layer by
layer, to --workdir in mlx-lm's format (so each process reads them the same way), and the
rows run one after another in subprocesses so GPU memory never holds two copies.

Sub-commands (used by `all`; handy alone): prepare, mlxlm, ours, mlxlm-pipe-rank, handoff-rank, copybw.
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
def _steady_ms(stamps: list[float], skip: int) -> float:
    gaps = [b - a for a, b in zip(stamps[skip:], stamps[skip + 1:])]
    return statistics.median(gaps) * 1e3


def row_mlxlm(model_dir: Path, tokens: int) -> dict:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(model_dir))
    stamps, toks = [], []
    for tok, _ in generate_step(mx.array(PROMPT), model, max_tokens=tokens):
        stamps.append(time.perf_counter())
        toks.append(int(tok))
    return {"ms_per_token": _steady_ms(stamps, 5), "peak_gb": mx.get_peak_memory() / 1e9,
            "tokens": toks[:FIRST_TOKENS]}


def _run_streams(engine, k: int, tokens: int) -> dict:
    import threading

    from mlxdist.runtime.api import GenerationRequest

    stamps: list[list[float]] = [[] for _ in range(k)]

    def one(i: int) -> None:
        req = GenerationRequest(prompt_tokens=tuple(PROMPT[: 4 + i]), max_tokens=tokens)
        for ev in engine.submit(req):
            if ev.token is not None:
                stamps[i].append(time.perf_counter())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the steady window: from when the last stream produced its 5th token to when the
    # first stream finished, every stream is decoding
    lo = max(s[5] for s in stamps)
    hi = min(s[-1] for s in stamps)
    n = sum(sum(1 for x in s if lo < x <= hi) for s in stamps)
    return {"ms_per_token": statistics.median(_steady_ms(s, 5) for s in stamps),
            "aggregate_tok_s": n / (hi - lo) if hi > lo else float("nan")}


def row_ours(model_dir: Path, ranks: int, tokens: int, concurrency: list[int], handoff: str = "messages",
             gpus: int = 2) -> dict:
    from mlxdist.runtime.engine import open_engine
    from mlxdist.runtime.launcher import LocalLauncher

    opts: dict = {"handoff": handoff}
    if ranks > 1:
        opts["launcher"] = LocalLauncher(rank_env=lambda r: {"CUDA_VISIBLE_DEVICES": str(r % gpus)})
    t = time.perf_counter()
    with open_engine(model_dir, ranks=ranks, max_concurrent=max(concurrency), **opts) as engine:
        load_s = time.perf_counter() - t
        first = engine.generate(PROMPT, max_tokens=min(FIRST_TOKENS, tokens))  # also the warm-up
        out = {"load_s": load_s, "handoff": handoff, "tokens": first, "streams": {}}
        for k in concurrency:
            out["streams"][str(k)] = _run_streams(engine, k, tokens)
        out["ms_per_token"] = out["streams"]["1"]["ms_per_token"]
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
    for _tok, _ in generate_step(mx.array(PROMPT), model, max_tokens=tokens):
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
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                       env=full_env, timeout=timeout)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("--workdir", default="/tmp/r1bench")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--concurrency", default="1,2,4")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--handoff", default="messages", help="ours: messages, collective or nccl")
    ap.add_argument("--profile", action="store_true", help="all: add the MLXDIST_PROFILE rows (messages)")
    a = ap.parse_args()
    workdir = Path(a.workdir)
    model_dir = workdir / f"r1-{a.layers}L-4bit"
    conc = [int(c) for c in a.concurrency.split(",")]
    if a.cmd == "prepare":
        print(json.dumps({"dir": str(prepare(workdir, a.layers))}))
    elif a.cmd == "mlxlm":
        print(json.dumps(row_mlxlm(model_dir, a.tokens)))
    elif a.cmd == "ours":
        print(json.dumps(row_ours(model_dir, a.ranks, a.tokens, conc, a.handoff, a.gpus)))
    elif a.cmd == "mlxlm-pipe-rank":
        mlxlm_pipe_rank(model_dir, a.tokens)
    elif a.cmd == "handoff-rank":
        handoff_rank()
    elif a.cmd == "copybw":
        print(json.dumps(copy_bandwidth()))
    elif a.cmd == "all":
        import mlx.core as mx

        t0 = time.perf_counter()
        res: dict = {"device": str(mx.default_device()), "layers": a.layers, "tokens": a.tokens}
        one = {"CUDA_VISIBLE_DEVICES": "0"}
        common = ["--workdir", a.workdir, "--layers", str(a.layers), "--tokens", str(a.tokens)]
        log("prepare"); res["prepare"] = _sub(["prepare", *common], one)
        res.update(weight_bytes_per_token(model_dir))
        log("copybw"); res["copy"] = _sub(["copybw"], one)
        log("mlxlm"); res["mlxlm_1gpu"] = _sub(["mlxlm", *common], one)
        log("ours 1"); res["mlxdist_1rank"] = _sub(["ours", *common, "--ranks", "1", "--concurrency", a.concurrency], one)
        two = ["ours", *common, "--ranks", "2", "--concurrency", a.concurrency, "--gpus", str(a.gpus)]
        if a.gpus < 2:  # the code path on CUDA, both ranks on GPU 0 (not the 2-GPU targets)
            log("ours 2 on 1 GPU")
            res["mlxdist_2rank_1gpu_messages"] = _sub(two, one)
        if a.gpus >= 2:
            log("handoff"); res["handoff"] = _two_ranks(["handoff-rank"])
            prof = Path(a.workdir) / "profile"
            log("ours 2"); res["mlxdist_2rank"] = _sub(two)
            log("ours 2 nccl"); res["mlxdist_2rank_nccl"] = _sub([*two, "--handoff", "nccl"])
            # where the time goes (--profile): one decode step per stage, timestamps only,
            # then with a sync after each stage's compute; then the NCCL runs' ticks
            variants = (("profile", {}, "messages"), ("profile_sync", {"MLXDIST_PROFILE_SYNC": "1"}, "messages"),
                        ("nccl_profile", {}, "nccl"))
            for variant, env, handoff in variants if a.profile else ():
                vdir = prof / variant
                vdir.mkdir(parents=True, exist_ok=True)
                for f in vdir.glob("*.tsv"):
                    f.unlink()
                log("ours 2", variant)
                row = _sub(["ours", *common, "--ranks", "2", "--concurrency", "1", "--handoff", handoff],
                           {"MLXDIST_PROFILE": str(vdir), **env})
                row["profile"] = profile_summary(vdir)
                res[f"mlxdist_2rank_{variant}"] = row
            log("mlxlm pipe"); res["mlxlm_pipe_2gpu"] = _two_ranks(["mlxlm-pipe-rank", *common])
        base = res["mlxlm_1gpu"].get("ms_per_token")
        if base:
            bw = res["copy"].get("copy_gb_s")
            if bw:
                res["roofline_ms_per_token"] = res["read_per_token_gb"] / bw * 1e3
            ratios = {}
            ours = [k for k in res if k.startswith("mlxdist_") and "profile" not in k]
            for k in (*ours, "mlxlm_pipe_2gpu"):
                ms = res.get(k, {}).get("ms_per_token")
                if ms:
                    ratios[f"{k}_speed_vs_mlxlm_1gpu"] = base / ms
            want = res["mlxlm_1gpu"].get("tokens")
            res["tokens_match_mlxlm"] = {k: res[k].get("tokens") == want for k in ours if "tokens" in res[k]}
            for k in ours:
                for c, row in res.get(k, {}).get("streams", {}).items():
                    ratios[f"{k}_{c}streams_aggregate_vs_mlxlm_1stream"] = row["aggregate_tok_s"] * base / 1e3
            res["ratios"] = ratios
        res["wall_s"] = time.perf_counter() - t0
        print(json.dumps(res, indent=1))
    else:
        raise SystemExit(f"unknown command {a.cmd}")


if __name__ == "__main__":
    main()
