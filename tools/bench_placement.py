"""Measured decode time of a pipeline-only plan vs an expert-parallel plan on the same
local ring ranks, with the cost model's prediction beside each measurement.

    PYTHONPATH=. python tools/bench_placement.py [--ranks 2 4] [--tokens 24]

The model is a tiny-ish random deepseek_v3 (float32: MLX's CPU gather_mm takes only
float32). The pipeline baseline is mlx-lm's own even pipeline (`model.model.pipeline`);
the expert-parallel run is mlxdist.runtime.expert_parallel. Both run in a self-contained
runner (tests/placement/ep_worker.py) and, under "engine", through the real engine
(`open_engine(ranks=N)` and `open_engine(ranks=N, expert_parallel=True)`: worker processes,
Coordinator, broadcasts, heartbeats), timed between streamed tokens. The cost model is calibrated
with two numbers measured in the same run -- the single-process step time (giving the
per-layer overhead that dominates a tiny model on a CPU) and one all_sum's latency on
loopback -- and then predicts both plans. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlxdist.placement.cost import CostParams, Profile, ep_times, pipeline_times  # noqa: E402
from mlxdist.placement.specs import GB, LinkSpec, NodeSpec, cluster_from_nodes  # noqa: E402
from mlxdist.placement.model import describe  # noqa: E402
from mlxdist.runtime.config import EngineConfig  # noqa: E402
from tests.placement.ranks import run_ranks  # noqa: E402
from tests.placement.tiny import TINY_DEEPSEEK, make_tiny_deepseek  # noqa: E402

CONFIG = dict(TINY_DEEPSEEK, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
              num_hidden_layers=8, n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
              q_lora_rank=128, kv_lora_rank=64, vocab_size=259)  # the tiny byte tokenizer's
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
NOMINAL_BW = 10 * GB  # bytes/s; irrelevant once the overhead is calibrated (bytes are tiny)


def median_step(doc: dict) -> float:
    return statistics.median(doc["step_s"][1:])  # the first step includes the prefill


def run(model_dir: Path, ranks: int, mode: str, tokens: int, repeat: int = 2) -> dict:
    """The best of `repeat` runs (this box is shared: the best run is the least disturbed)."""
    docs = [_run_once(model_dir, ranks, mode, tokens) for _ in range(repeat)]
    return min(docs, key=median_step)


def _run_once(model_dir: Path, ranks: int, mode: str, tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        res = run_ranks(ranks, [str(ROOT / "tests/placement/ep_worker.py"), str(model_dir), str(out),
                                ",".join(map(str, PROMPT)), str(tokens), mode], timeout=300)
        if any(rc for rc, _ in res):
            raise SystemExit("\n".join(err for _, err in res))
        return json.loads(out.read_text())


def engine_step(model_dir: Path, ranks: int, expert_parallel: bool, tokens: int) -> tuple[float, list[int]]:
    """Median time between streamed tokens of one request through the engine (warmed up)."""
    from mlxdist.runtime.api import GenerationRequest
    from mlxdist.runtime.engine import open_engine

    with open_engine(model_dir, EngineConfig(expert_parallel=expert_parallel), ranks=ranks) as eng:
        eng.generate(PROMPT, max_tokens=4)
        times, out, t0 = [], [], time.perf_counter()
        for ev in eng.submit(GenerationRequest(tuple(PROMPT), tokens)):
            if ev.token is not None:
                out.append(ev.token)
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
    return statistics.median(times[1:]), out


def single_process_step(model_dir: Path, tokens: int) -> tuple[float, list[int]]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    times, out, t0 = [], [], time.perf_counter()
    for tok, _ in generate_step(mx.array(PROMPT), model, max_tokens=tokens,
                                sampler=lambda lp: mx.argmax(lp, axis=-1)):
        out.append(int(tok))
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    return statistics.median(times[1:]), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[2])
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_deepseek(Path(tmp) / "model", seed=3, config=CONFIG)
        sys.path.insert(0, str(ROOT / "tools"))
        from tiny_models import write_tokenizer

        write_tokenizer(model_dir)  # the engine wants a tokenizer
        spec = describe(CONFIG, bits=16, dtype_bytes=4, name="bench-deepseek")
        prof = Profile(spec)
        _, single_tokens = single_process_step(model_dir, args.tokens)  # mlx-lm alone: the tokens
        base = run(model_dir, 1, "pp", args.tokens)  # one rank, same worker: the time baseline
        single_s = median_step(base)
        results = []
        for n in args.ranks:
            pp = run(model_dir, n, "pp", args.tokens)
            ep = run(model_dir, n, "ep", args.tokens)
            eng_pp, eng_pp_tokens = engine_step(model_dir, n, False, args.tokens)
            eng_ep, eng_ep_tokens = engine_step(model_dir, n, True, args.tokens)
            alpha = ep["allsum_s"] / (2 * (n - 1))  # ring all-reduce: 2(n-1) messages
            # calibrate: one node's step = bytes / bandwidth + layers x overhead
            node = NodeSpec("local", 64 * GB, NOMINAL_BW, 1e15, 0, "cpu")
            one = cluster_from_nodes([node], "loopback", efficiency=1.0)
            bytes_s = prof.busy_time(node, one, CostParams(layer_overhead_s=0.0), 0, prof.L, 1, len(PROMPT),
                                     head=True)
            cp = CostParams(layer_overhead_s=max(0.0, (single_s - bytes_s) / prof.L), kv_position=0.0)
            nodes = [NodeSpec(f"r{i}", 64 * GB, NOMINAL_BW, 1e15, 0, "cpu") for i in range(n)]
            links = tuple(LinkSpec(f"r{i}", f"r{(i + 1) % n}", 5 * GB, alpha) for i in range(n))
            cl = cluster_from_nodes(nodes, "loopback", links, efficiency=1.0)
            counts = [prof.L // n + (1 if i < prof.L % n else 0) for i in range(n)]
            bounds = [sum(counts[:i]) for i in range(n + 1)]
            stages = [(f"r{i}", bounds[i], bounds[i + 1]) for i in range(n)]
            pred_pp = pipeline_times(prof, cl, cp, stages, 2 * len(PROMPT), 1)[0]
            owned = {f"r{i}": len(r) for i, r in enumerate(_split(CONFIG["n_routed_experts"], n))}
            pred_ep = ep_times(prof, cl, cp, tuple(owned), owned, 2 * len(PROMPT), 1)[0]
            results.append({
                "ranks": n,
                "allsum_ms": round(ep["allsum_s"] * 1e3, 3),
                "pipeline": {"measured_ms_per_token": round(median_step(pp) * 1e3, 2),
                             "predicted_ms_per_token": round(pred_pp * 1e3, 2),
                             "tokens_equal_single_process": pp["tokens"] == single_tokens},
                "expert_parallel": {"measured_ms_per_token": round(median_step(ep) * 1e3, 2),
                                    "predicted_ms_per_token": round(pred_ep * 1e3, 2),
                                    "tokens_equal_single_process": ep["tokens"] == single_tokens},
                "engine": {"pipeline_ms_per_token": round(eng_pp * 1e3, 2),
                           "expert_parallel_ms_per_token": round(eng_ep * 1e3, 2),
                           "ep_over_pipeline": round(eng_ep / eng_pp, 3),
                           "pipeline_tokens_equal_single_process": eng_pp_tokens == single_tokens,
                           "ep_tokens_equal_single_process": eng_ep_tokens == single_tokens},
                "measured_ep_over_pipeline": round(median_step(ep) / median_step(pp), 3),
                "measured_pipeline_over_one_rank": round(median_step(pp) / single_s, 3),
                "measured_ep_over_one_rank": round(median_step(ep) / single_s, 3),
                "predicted_ep_over_pipeline": round(pred_ep / pred_pp, 3),
            })
        print(json.dumps({
            "model": {k: CONFIG[k] for k in ("hidden_size", "num_hidden_layers", "n_routed_experts",
                                              "num_experts_per_tok")},
            "baseline_one_rank_ms_per_token": round(single_s * 1e3, 2),
            "one_rank_tokens_equal_mlx_lm": base["tokens"] == single_tokens,
            "calibrated_layer_overhead_ms": round(cp.layer_overhead_s * 1e3, 3),
            "tokens": args.tokens,
            "runs": results,
            "note": "CPU ranks share this machine's cores (4 ranks on 2 cores: all_sum waits on the "
                    "scheduler); a tiny model is overhead-bound, so "
                    "expert parallelism (attention replicated, + one all_sum per MoE layer) cannot "
                    "win here: on Macs it pays only when expert bytes dominate and links are RDMA.",
        }, indent=2))


def _split(n: int, ranks: int) -> list[range]:
    from mlxdist.runtime.expert_parallel import split_experts

    return [range(len(x)) for x in split_experts(n, ranks)]


if __name__ == "__main__":
    main()
