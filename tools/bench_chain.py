"""What a mixed plan's chained sums cost (mlxdist/runtime/chain.py), against the all_sum
they stand in for, on ring ranks over 127.0.0.1; prints one JSON object.

    PYTHONPATH=. python tools/bench_chain.py [--reps 20] [--tokens 24] [--out FILE]

- "combine": one MoE layer's combine of B rows x hidden float32, median seconds per call
  (each call evaluated alone): all_sum over the whole group of 2 and of 3 ranks, and
  chain_sum (both schemes) over 2 members of a group of 2, 3 members of a group of 3,
  and ranks 1..2 of a group of 3 (the mixed plan's stage; rank 0 idle); hidden 64 (the
  tiny model) and 7168 (DeepSeek-R1), B = 1, 4, 16.
- "plans": greedy decode of the tiny deepseek_v3 (4 layers, 16 experts) on 3 ranks, as
  the mixed plan (rank 0 layers [0, 2), ranks 1-2 an EP stage over [2, 4) combined by
  chain_sum), a 3-stage pipeline, and whole-group EP (all_sum); tokens/s from the median
  decode step, through tests/runtime/test_runtime_chain.py's ranks.
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

HIDDEN = {"tiny": 64, "deepseek-r1": 7168}
ROWS = [1, 4, 16]
SCHEMES = ["relay", "reduce"]
PLAN_WORKER = ROOT / "tests" / "runtime" / "test_runtime_chain.py"


def combine_rank(out: Path, reps: int) -> None:
    """One rank of the combine timings: every rank takes part in every all_sum barrier, the
    members of each case in its timed calls; each rank writes its medians."""
    import mlx.core as mx

    from mlxdist.runtime.chain import chain_sum

    group = mx.distributed.init(backend="ring")
    rank, size = group.rank(), group.size()
    cases = [("all_sum", None, 0, size - 1)]
    cases += [(f"chain_{s}", s, 0, size - 1) for s in SCHEMES]
    if size == 3:
        cases += [(f"chain_{s}_ranks_1_2", s, 1, 2) for s in SCHEMES]
    times = {}
    for name, scheme, first, last in cases:
        for model, hidden in HIDDEN.items():
            for rows in ROWS:
                mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))  # everyone here
                if not first <= rank <= last:
                    continue
                x = mx.random.normal((rows, 1, hidden))
                mx.eval(x)
                call = (lambda: mx.distributed.all_sum(x, group=group)) if scheme is None else \
                    (lambda: chain_sum(x, group, first, last, scheme))
                samples = []
                for i in range(reps + 3):
                    t0 = time.perf_counter()
                    mx.eval(call())
                    if i >= 3:
                        samples.append(time.perf_counter() - t0)
                times[f"{name}/{model}/B{rows}"] = statistics.median(samples)
    (out / f"rank{rank}.json").write_text(json.dumps(times))


def run_combine(ranks: int, reps: int) -> dict[str, float]:
    """Median seconds per case: the slowest member's median."""
    from tests.placement.ranks import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        res = run_ranks(ranks, [__file__, "--combine-rank", tmp, "--reps", str(reps)], timeout=300)
        if any(code for code, _ in res):
            raise SystemExit("\n".join(err for _, err in res))
        per_rank = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(ranks)]
    keys = {k for t in per_rank for k in t}
    return {k: max(t[k] for t in per_rank if k in t) for k in sorted(keys)}


def run_plans(tokens: int) -> dict[str, dict]:
    from tests.placement.ranks import run_ranks
    from tests.placement.tiny import make_tiny_deepseek

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_deepseek(Path(tmp) / "deepseek")
        for name, plan, scheme in [("mixed_relay", "mixed", "relay"), ("mixed_reduce", "mixed", "reduce"),
                                   ("pipeline_3_stages", "pipeline", "-"), ("ep_whole_group", "ep", "-")]:
            d = Path(tmp) / name
            d.mkdir()
            res = run_ranks(3, [str(PLAN_WORKER), "model", plan, str(model), str(d), "1,5,9,33,100,7,42",
                                str(tokens + 1), scheme], timeout=300)
            if any(code for code, _ in res):
                raise SystemExit("\n".join(err for _, err in res))
            got = json.loads((d / "rank2.json").read_text())
            step = statistics.median(got["step_s"][1:])  # decode steps: the prefill left out
            out[name] = {"decode_step_ms": round(step * 1e3, 3), "tok_s": round(1 / step, 1),
                         "tokens": got["tokens"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=24, help="decode steps per plan")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--combine-rank", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.combine_rank:
        combine_rank(args.combine_rank, args.reps)
        return
    import mlx.core as mx

    combine = {f"{n}_ranks": {k: round(v * 1e3, 4) for k, v in run_combine(n, args.reps).items()} for n in (2, 3)}
    plans = run_plans(args.tokens)
    base = plans["pipeline_3_stages"]["decode_step_ms"]
    result = {
        "what": "per-call combine ms (median, slowest member) and tiny-model decode on ring ranks over 127.0.0.1",
        "machine": "CPU, 2 shared cores, MLX ring backend over loopback", "mlx": mx.__version__,
        "reps": args.reps, "decode_tokens": args.tokens, "combine_ms": combine, "plans": plans,
        "ratios": {
            "mixed_relay_step_over_pipeline": round(plans["mixed_relay"]["decode_step_ms"] / base, 2),
            "mixed_reduce_step_over_pipeline": round(plans["mixed_reduce"]["decode_step_ms"] / base, 2),
            "ep_step_over_pipeline": round(plans["ep_whole_group"]["decode_step_ms"] / base, 2),
        },
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
