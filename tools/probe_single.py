"""Where a lone stream loses to mlx-lm's `generate_step` (prints JSON).

The engine's lone row runs mlx-lm's model calls, cache and sampling ops, yet its single
stream has measured 0.67-1.09 x `generate_step` on lent GPUs. This times the same model,
greedy, one prompt, ms per token in the steady part (median gap between tokens), as:

- `main`: `generate_step` on the main thread (what tools/bench_gpu.py's reference does);
- `thread`: the same loop on another thread (the engine's coordinator is a thread);
- `thread_stream`: on another thread inside `mx.stream(mx.new_stream(gpu))`, as
  generate_step's own `generation_stream` is made on the main thread;
- `thread_queue`: on another thread that hands each token to a consumer thread through a
  queue (the engine's event path, without the engine);
- `engine`: mlxdist's engine in this process (one rank), a lone request.

Each variant runs `--rounds` times, interleaved; the medians are kept. `--device-path`
runs the engine's coordinator as it runs beside a GPU (steps queued ahead, not computed as
they are queued: coordinator.queue_computes) on MLX's CPU backend, where a tiny model makes
every per-token cost of the host show.

    python tools/probe_single.py MODEL_DIR --tokens 200 --rounds 3
    python tools/probe_single.py TINY_MODEL_DIR --tokens 600 --device-path   # CPU
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import threading
import time

import mlx.core as mx
from bench_gpu import _steady_ms  # tools/: the bench's median gap between tokens
from mlx_lm import load
from mlx_lm.generate import generate_step

PROMPT = [1 + (7 * j) % 1000 for j in range(24)]
SKIP = 10  # tokens before the steady part


def loop(model, tokens: int, out: list[float], hand=None) -> None:
    for tok, _ in generate_step(mx.array(PROMPT), model, max_tokens=tokens):
        if hand is not None:
            hand(tok)
        else:
            out.append(time.perf_counter())


def on_thread(fn) -> None:
    t = threading.Thread(target=fn)
    t.start()
    t.join()


def variant(name: str, model, tokens: int, engine=None) -> float:
    stamps: list[float] = []
    if name == "main":
        loop(model, tokens, stamps)
    elif name == "thread":
        on_thread(lambda: loop(model, tokens, stamps))
    elif name == "thread_stream":
        def body() -> None:
            with mx.stream(mx.new_stream(mx.default_device())):
                loop(model, tokens, stamps)
        on_thread(body)
    elif name == "thread_queue":
        q: queue.Queue = queue.Queue()

        def consume() -> None:
            while q.get() is not None:
                stamps.append(time.perf_counter())
        c = threading.Thread(target=consume)
        c.start()
        on_thread(lambda: (loop(model, tokens, stamps, hand=q.put), q.put(None)))
        c.join()
    elif name == "engine":
        from mlxdist.runtime.api import GenerationRequest

        for _ in engine.submit(GenerationRequest(tuple(PROMPT), tokens)):
            stamps.append(time.perf_counter())
    return _steady_ms(stamps, SKIP)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="main,thread,thread_stream,thread_queue,engine")
    p.add_argument("--device-path", action="store_true", help="the coordinator's GPU code path (CPU backend)")
    a = p.parse_args()
    names = a.variants.split(",")
    if a.device_path:
        from mlxdist.runtime import coordinator

        coordinator.queue_computes = lambda: False
    model, _ = load(a.model_dir)
    engine = None
    if "engine" in names:
        from mlxdist.runtime.engine import open_engine

        engine = open_engine(a.model_dir)
        engine.generate(PROMPT, max_tokens=16)  # warm-up
    loop(model, 16, [])  # warm-up
    runs: dict[str, list[float]] = {n: [] for n in names}
    try:
        for _ in range(a.rounds):
            for n in names:
                runs[n].append(variant(n, model, a.tokens, engine))
    finally:
        if engine is not None:
            engine.close()
    ms = {n: round(statistics.median(v), 4) for n, v in runs.items()}
    out = {"device": str(mx.default_device()), "mlx": mx.__version__, "tokens": a.tokens, "rounds": a.rounds,
           "device_path": a.device_path,
           "ms_per_token": ms, "runs": runs,
           "vs_main": {n: round(ms["main"] / v, 3) for n, v in ms.items() if "main" in ms}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
