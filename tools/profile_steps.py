"""Where a decode step's time goes, at several batch widths, on one model directory.

    python tools/profile_steps.py floor MODEL_DIR [--steps 32] [--widths 1,8,32,64]
    python tools/profile_steps.py engine MODEL_DIR [--max-tokens 64] [--temperature 0.7]

Prints one JSON object (logs go to stderr).

`floor`: mlx-lm's model alone in a bare loop (no scheduler), a 200-token prompt then
`--steps` decode steps at each width B, in three forms: its KVCache + argmax (the floor),
its BatchKVCache + argmax, and its KVCache + mlxdist's per-row sampler (batch.sample_rows,
temperature 0.7, each row its own key). Each as ms per step, synchronous (eval every step)
and pipelined (step k+1 built before waiting for step k, as generate_step does).

`engine`: mlxdist's engine in this process (open_engine, one rank), requests submitted
directly (no HTTP), at 1x1, 1x8, 8x8 and 1x64 (prompts x choices; the 8 prompts differ, so
their rows have different lengths), `--max-tokens` each. For each: wall time, ms per step,
and the time spent inside the coordinator's parts (each wrapped with a timer: send and
receive of a group step, the runner's forward, a row's leave, the engine's per-token event
handling, and every mx.eval in the process: mostly the coordinator waiting for a step), with
call counts. Host time shows there; so does the device
where a part waits for it (on a GPU `mx.async_eval` launches the kernels).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from typing import Any


def log(*a: object) -> None:
    print("[profile_steps]", *a, file=sys.stderr, flush=True)


def floor(path: str, steps: int, widths: list[int]) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

    from mlxdist.runtime.api import SamplingParams
    from mlxdist.runtime.batch import sample_rows
    from mlxdist.runtime.sampling import SlotSampler, encode_params

    model, _ = load(path)

    def bench(b: int, kind: str) -> list[float]:
        layers = len(model.model.layers)
        cache = [BatchKVCache([0] * b) for _ in range(layers)] if kind == "batchcache" else make_prompt_cache(model)
        mx.eval(model(mx.array([[1 + (i * 7) % 1000 for i in range(200)]] * b), cache=cache))
        samplers = [SlotSampler.decode(encode_params(SamplingParams(temperature=0.7), 1 + i, 0, [])) for i in range(b)]

        def step(y: Any) -> Any:
            logits = model(y, cache=cache)[:, -1]
            if kind == "sample":
                return sample_rows(samplers, logits)[0][:, None]
            return mx.argmax(logits, axis=-1)[:, None]

        y = mx.zeros((b, 1), mx.int32)
        for _ in range(3):
            y = step(y)
            mx.eval(y)
        t = time.perf_counter()
        for _ in range(steps):
            y = step(y)
            mx.eval(y)
        sync = (time.perf_counter() - t) / steps * 1e3
        t = time.perf_counter()
        y = step(y)
        mx.async_eval(y)
        for _ in range(steps):
            nxt = step(y)
            mx.async_eval(nxt)
            y.tolist()
            y = nxt
        y.tolist()
        return [round(sync, 3), round((time.perf_counter() - t) / (steps + 1) * 1e3, 3)]

    out = {}
    for b in widths:
        out[str(b)] = {k: bench(b, k) for k in ("kvcache", "batchcache", "sample")}
        log(b, out[str(b)])
    return {"ms_per_step_sync_pipelined": out, "steps": steps}


def engine(path: str, max_tokens: int, temperature: float) -> dict[str, Any]:
    import mlx.core as mx

    from mlxdist.runtime import coordinator, pipeline
    from mlxdist.runtime.api import GenerationRequest, SamplingParams
    from mlxdist.runtime.config import EngineConfig
    from mlxdist.runtime.engine import GroupEngine, open_engine

    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()

    def timed(owner: Any, name: str, key: str) -> None:
        f = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
                calls[key] += 1
        setattr(owner, name, wrapper)

    for name in ("_send_group_step", "_receive_group_step", "accept", "_issue", "_receive_one", "_send_setup",
                 "_send_leave", "_send_slot_message"):
        timed(coordinator.Coordinator, name, name)
    timed(GroupEngine, "_on_event", "engine._on_event")
    timed(pipeline.StageRunner, "step", "runner.step")
    timed(coordinator.mx, "eval", "mx.eval")  # the coordinator's waits for the device
    eng = open_engine(path, EngineConfig(max_concurrent=64), ranks=1)

    def prompt(i: int) -> tuple[int, ...]:
        return tuple(eng.tokenizer.encode(f"Problem {i}: Tom has 3 apples and buys {i} more, then {i * 3} more. "
                                          "How many apples does he have? Think step by step. " * 3))

    def run(prompts: int, n: int) -> int:
        handles = [eng.submit(GenerationRequest(prompt(p), max_tokens,
                                                SamplingParams(temperature=temperature, seed=100 * p + i)))
                   for p in range(prompts) for i in range(n)]
        counts: list[int] = []
        threads = [threading.Thread(target=lambda h=h: counts.append(len(h.tokens()))) for h in handles]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts)

    run(1, 8)  # warm-up (kernels, caches)
    run(8, 8)
    runs = {}
    for prompts, n in ((1, 1), (1, 8), (8, 8), (1, 64)):
        spent.clear()
        calls.clear()
        t = time.perf_counter()
        tokens = run(prompts, n)
        wall = time.perf_counter() - t
        runs[f"{prompts}x{n}"] = {
            "tokens": tokens, "wall_s": round(wall, 3), "ms_per_step": round(wall / max_tokens * 1e3, 2),
            "parts_ms_calls": {k: [round(spent[k] * 1e3, 1), calls[k]] for k in sorted(spent, key=lambda k: -spent[k])}}
        log(f"{prompts}x{n}", runs[f"{prompts}x{n}"]["ms_per_step"], "ms per step")
    eng.close()
    return {"runs": runs, "max_tokens": max_tokens, "temperature": temperature,
            "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("floor", "engine"))
    p.add_argument("model_dir")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--widths", default="1,8,32,64")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    args = p.parse_args(argv)
    import mlx.core as mx

    report: dict[str, Any] = {"tool": "profile_steps", "mode": args.mode, "model_dir": args.model_dir,
                              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "device": str(mx.default_device())}
    if args.mode == "floor":
        report.update(floor(args.model_dir, args.steps, [int(w) for w in args.widths.split(",")]))
    else:
        report.update(engine(args.model_dir, args.max_tokens, args.temperature))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
