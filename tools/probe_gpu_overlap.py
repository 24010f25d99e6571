"""How a ring hand-off between two GPU stages overlaps (or not) under MLX's CUDA backend.

    python tools/probe_gpu_overlap.py [--stage-ms 1.5] [--iters 150]

Spawns two ranks (CUDA_VISIBLE_DEVICES=r, MLX_RANK=r, ring backend over 127.0.0.1) that play
ping-pong with mlxdist's message shape: an int32[8] header the receiver waits for on the
host, then a (1, 1, 7168) bf16 payload. Each rank runs a synthetic GPU "stage" on what it
receives (bf16 matrix-vector products over ~1.2 GB of weights, calibrated to --stage-ms)
and sends the result on. Rank 0 times whole cycles (= 2 stages + 2 hand-offs); each rank
times how long its host thread is held from the header's arrival until its last
async_eval returns ("block"). One JSON table on stdout, one row per way of writing a hop:

  fused            x=recv; y=stage(x); async_eval([send(hdr), send(depends(y, hdr))])  (runtime today)
  fused_hdr_first  the header's send evaluated on its own first, then as fused
  fused_cpu_stream as fused, every send/recv on a dedicated mx.new_stream(mx.cpu)
  fused_gpu_stream as fused, send/recv with stream=mx.gpu (if the ring backend takes it)
  split            eval(x) on the host; async_eval(y); then async_eval(sends)
  split_sync       eval(x); eval(y) (host waits for the GPU); then async_eval(sends)
  split_hdr_first  eval(x); async_eval(send(hdr)); async_eval(y); async_eval(send(y))

  nccl_*           the hand-off as an NCCL all_sum on the GPU stream (see nccl_main)

With --model DIR (iters = decode steps): the bench's real R1-shaped layers split over the
two GPUs with NCCL hand-offs (see model_main); compare with `bench_gpu.py mlxlm` on one GPU.

plus baselines: the stage alone (one GPU, two stages back to back) and the bare hand-off.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HIDDEN = int(os.environ.get("PROBE_HIDDEN", 7168))  # smaller only for a CPU smoke test
N_WEIGHTS = 12  # 12 x 7168^2 bf16 = 1.23 GB: every matvec reads HBM, not L2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_stage(mx, rank: int, stage_ms: float):
    """A synthetic stage of ~stage_ms on this GPU: bf16 matvecs, each followed by a norm."""
    mx.random.seed(rank)
    weights = []
    for _ in range(N_WEIGHTS):  # one at a time, evaluated as we go
        w = (mx.random.normal((HIDDEN, HIDDEN)) * HIDDEN ** -0.5).astype(mx.bfloat16)
        mx.eval(w)
        weights.append(w)

    def stage_k(x: mx.array, k: int) -> mx.array:
        for i in range(k):
            x = x @ weights[i % N_WEIGHTS]
            x = x * mx.rsqrt(mx.mean(x.astype(mx.float32) ** 2) + 1e-6).astype(x.dtype)
        return x

    def timed(f, n: int = 30) -> float:
        x = mx.ones((1, 1, HIDDEN), mx.bfloat16)
        mx.eval(f(x))
        t = time.perf_counter()
        for _ in range(n):
            x = f(x)
            mx.async_eval(x)
        mx.eval(x)
        return (time.perf_counter() - t) / n * 1e3

    per = timed(lambda x: stage_k(x, 8)) / 8
    k = max(1, round(stage_ms / per))
    stage = lambda x: stage_k(x, k)  # noqa: E731
    res: dict = {"rank": rank, "matvecs_per_stage": k, "stage_ms": timed(stage),
                 "two_stages_one_gpu_async_ms": timed(lambda x: stage(stage(x)))}
    x = mx.ones((1, 1, HIDDEN), mx.bfloat16)
    t = time.perf_counter()
    for _ in range(30):
        x = stage(stage(x))
        mx.eval(x)
    res["two_stages_one_gpu_sync_ms"] = (time.perf_counter() - t) / 30 * 1e3
    return stage, res


def nccl_main(stage_ms: float, iters: int) -> None:
    """The hand-off as an NCCL all_sum (the sender contributes its hidden state, the other
    rank zeros): it runs on the GPU stream, so no CPU<->GPU event sits between stages.
    nccl_chain: rank 0 queues cycle i+1 before reading cycle i's result (host sync one
    behind); nccl_sync: rank 0 reads each cycle's result before the next (a token per step);
    nccl_follower_sync: as nccl_chain, but rank 1 reads what it received on the host before
    queueing its stage (as a follower that must see a header first)."""
    import mlx.core as mx

    group = mx.distributed.init(backend="nccl", strict=True)
    rank = group.rank()
    stage, res = make_stage(mx, rank, stage_ms)
    zeros = mx.zeros((1, 1, HIDDEN), mx.bfloat16)

    def run(variant: str, compute: bool = True) -> dict:
        f = stage if compute else (lambda v: v * 1)
        x = mx.ones((1, 1, HIDDEN), mx.bfloat16)
        prev, blocks = None, []
        warm = 20
        for i in range(iters):
            if i == warm:
                t_start = time.perf_counter()
            t0 = time.perf_counter()
            if rank == 0:
                b = mx.distributed.all_sum(f(x), group=group)
                # the two collectives must run in the same order on both ranks
                x = mx.distributed.all_sum(mx.depends(zeros, b), group=group)
                mx.async_eval(x)
                if variant == "nccl_sync":
                    mx.eval(x)
                elif prev is not None:
                    mx.eval(prev)
                prev = x
            else:
                b = mx.distributed.all_sum(zeros, group=group)
                if variant == "nccl_follower_sync":
                    mx.eval(b)
                c = mx.distributed.all_sum(f(b), group=group)
                mx.async_eval(c)
                if variant != "nccl_follower_sync" and prev is not None:
                    mx.eval(prev)  # bounded queue
                prev = c
            blocks.append(time.perf_counter() - t0)
        mx.eval(x)
        mx.synchronize()
        out = {"block_ms": statistics.median(blocks[warm:]) * 1e3}
        if rank == 0:
            out["cycle_ms"] = (time.perf_counter() - t_start) / (iters - warm) * 1e3
        return out

    rows = {}
    for v in ["nccl_handoff_only", "nccl_chain", "nccl_sync", "nccl_follower_sync"]:
        rows[v] = run("nccl_chain", compute=False) if v == "nccl_handoff_only" else run(v)
        print(f"[probe r{rank}] {v} {rows[v]}", file=sys.stderr, flush=True)
    res["rows"] = rows
    print(json.dumps(res), flush=True)


def model_main(model_dir: str, steps: int) -> None:
    """Real layers with NCCL hand-offs: the model tools/bench_gpu.py prepares, split in half
    (rank 0: embedding + first half of the layers; rank 1: the rest, norm, head and argmax),
    decoding one stream greedily. Rank 0 sends hidden states as an all_sum that rank 1 joins
    with zeros; the token comes back the same way. model_chain: rank 0 queues step i+1 on
    the lazy token of step i, then reads token i (mlxdist's chained step); model_sync: rank
    0 reads each token before the next step; model_follower_sync: as chain, and rank 1 reads
    the received hidden state on the host before its layers (a follower that must see a
    header first)."""
    from pathlib import Path

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    # PROBE_MODEL_BACKEND=ring: a CPU smoke test of this code (ring has all_sum too)
    group = mx.distributed.init(backend=os.environ.get("PROBE_MODEL_BACKEND", "nccl"), strict=True)
    rank = group.rank()
    model, _ = load_model(Path(model_dir), lazy=True)
    inner = model.model
    half = len(inner.layers) // 2
    mine = list(inner.layers[:half] if rank == 0 else inner.layers[half:])
    for layer in mine:  # only this rank's half is ever read from disk
        mx.eval(layer.parameters())
    mx.eval(inner.embed_tokens.parameters() if rank == 0 else [inner.norm.parameters(), model.lm_head.parameters()])
    caches = make_prompt_cache(model)
    caches = caches[:half] if rank == 0 else caches[half:]
    dt = inner.norm.weight.dtype
    zeros_h = mx.zeros((1, 1, int(inner.norm.weight.shape[0])), dt)
    zeros_t = mx.zeros((1, 1), mx.float32)

    def step0(tok: mx.array) -> mx.array:
        h = inner.embed_tokens(tok)
        for layer, c in zip(mine, caches):
            h = layer(h, None, c)
        b = mx.distributed.all_sum(h.astype(dt), group=group)
        return mx.distributed.all_sum(mx.depends(zeros_t, b), group=group)  # the token

    def step1(read_first: bool) -> mx.array:
        h = mx.distributed.all_sum(zeros_h, group=group)
        if read_first:
            mx.eval(h)
        for layer, c in zip(mine, caches):
            h = layer(h, None, c)
        logits = model.lm_head(inner.norm(h))
        tok = mx.argmax(logits[:, -1, :], axis=-1).astype(mx.float32).reshape(1, 1)
        return mx.distributed.all_sum(tok, group=group)

    def as_tok(t: mx.array) -> mx.array:
        return t.astype(mx.int32)

    rows, warm = {}, 8
    for v in ["model_chain", "model_sync", "model_follower_sync"]:
        stamps, toks = [], []
        if rank == 0:
            t = step0(mx.array([[0]], mx.int32))
            mx.async_eval(t)
            for i in range(steps):
                nxt = step0(as_tok(t)) if (v != "model_sync" and i < steps - 1) else None
                if nxt is not None:
                    mx.async_eval(nxt)
                toks.append(int(t.item()))
                stamps.append(time.perf_counter())
                if i < steps - 1:
                    t = nxt if nxt is not None else step0(mx.array([[toks[-1]]], mx.int32))
                    mx.async_eval(t)
        else:
            prev = None
            for i in range(steps):
                c = step1(v == "model_follower_sync")
                mx.async_eval(c)
                if prev is not None:
                    mx.eval(prev)
                prev = c
            mx.eval(prev)
        mx.synchronize()
        if rank == 0:
            rows[v] = {"ms_per_token": (stamps[-1] - stamps[warm]) / (steps - 1 - warm) * 1e3,
                       "tokens": toks[:12]}
        print(f"[probe r{rank}] {v} {rows.get(v)}", file=sys.stderr, flush=True)
    print(json.dumps({"rank": rank, "rows": rows, "peak_gb": mx.get_peak_memory() / 1e9}), flush=True)


def rank_main(stage_ms: float, iters: int) -> None:
    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    rank = group.rank()
    peer = 1 - rank
    stage, res = make_stage(mx, rank, stage_ms)

    cpu_s = mx.new_stream(mx.cpu)

    def hop(variant: str, hdr: mx.array, x_in, compute: bool) -> float:
        """Receive a payload (header already here), compute, send on. Returns the seconds
        the host thread was held."""
        skw = {}
        if variant == "fused_cpu_stream":
            skw = {"stream": cpu_s}
        elif variant == "fused_gpu_stream":
            skw = {"stream": mx.gpu}
        t0 = time.perf_counter()
        x = mx.distributed.recv((1, 1, HIDDEN), mx.bfloat16, peer, group=group, **skw) if x_in is None else x_in
        if variant.startswith("split"):
            mx.eval(x)
        y = stage(x) if compute else x
        if variant in ("fused_hdr_first", "split_hdr_first"):
            sh = mx.distributed.send(hdr, peer, group=group, **skw)
            mx.async_eval(sh)
            if variant == "split_hdr_first":
                mx.async_eval(y)
            mx.async_eval(mx.distributed.send(mx.depends(y, sh), peer, group=group, **skw))
            return time.perf_counter() - t0
        if variant == "split":
            mx.async_eval(y)
        elif variant == "split_sync":
            mx.eval(y)
        sh = mx.distributed.send(hdr, peer, group=group, **skw)
        mx.async_eval([sh, mx.distributed.send(mx.depends(y, sh), peer, group=group, **skw)])
        return time.perf_counter() - t0

    def recv_header(variant: str) -> mx.array:
        skw = {"stream": cpu_s} if variant == "fused_cpu_stream" else {}
        if variant == "fused_gpu_stream":
            skw = {"stream": mx.gpu}
        h = mx.distributed.recv((8,), mx.int32, peer, group=group, **skw)
        mx.eval(h)
        return h

    def run(variant: str, compute: bool = True) -> dict:
        hdr = mx.array([2, 0, 1, 1, 2, 0, 0, 0], dtype=mx.int32)
        blocks, waits = [], []
        mx.eval(hdr)
        if rank == 0:  # rank 0 starts the ball: its first stage needs no recv
            hop(variant, hdr, mx.ones((1, 1, HIDDEN), mx.bfloat16), compute)
        t_start = None
        warm = 20
        for i in range(iters):
            if i == warm:
                t_start = time.perf_counter()
            tw = time.perf_counter()
            recv_header(variant)
            waits.append(time.perf_counter() - tw)
            if rank == 0 and i == iters - 1:  # the last reply: take it, send nothing
                x = mx.distributed.recv((1, 1, HIDDEN), mx.bfloat16, peer, group=group)
                mx.eval(x)
                break
            blocks.append(hop(variant, hdr, None, compute))
        mx.synchronize()
        out = {"block_ms": statistics.median(blocks[warm:]) * 1e3,
               "wait_ms": statistics.median(waits[warm:]) * 1e3}
        if rank == 0:
            out["cycle_ms"] = (time.perf_counter() - t_start) / (iters - 1 - warm) * 1e3
        return out

    variants = ["handoff_only", "fused", "fused_hdr_first", "fused_cpu_stream",
                "split", "split_sync", "split_hdr_first", "fused_gpu_stream"]
    rows = {}
    for v in variants:
        try:
            rows[v] = run("fused", compute=False) if v == "handoff_only" else run(v)
            print(f"[probe r{rank}] {v} {rows[v]}", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 (the table says which ones the backend refuses)
            rows[v] = {"error": f"{type(e).__name__}: {e}"[:300]}
            if v == "fused_gpu_stream":
                continue  # both ranks raise at the first op; nothing is in flight
            raise
    res["rows"] = rows
    res["peak_gb"] = mx.get_peak_memory() / 1e9
    print(json.dumps(res), flush=True)


def two_ranks(a: argparse.Namespace, env: dict) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, __file__, "--stage-ms", str(a.stage_ms), "--iters", str(a.iters)],
                              stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, MLX_RANK=str(r), CUDA_VISIBLE_DEVICES=str(r), **env))
             for r in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=a.timeout)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0])
    return [json.loads(o.strip().splitlines()[-1]) if o.strip() else {"error": "no output"} for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage-ms", type=float, default=1.5)
    ap.add_argument("--iters", type=int, default=150)
    ap.add_argument("--timeout", type=float, default=150)
    ap.add_argument("--model", help="a model dir from tools/bench_gpu.py prepare: real layers, NCCL hand-offs")
    ap.add_argument("--ring-only", action="store_true", help="skip the NCCL rows (no GPU: CPU smoke test)")
    a = ap.parse_args()
    if "MLX_RANK" in os.environ and os.environ.get("PROBE_MODEL"):
        model_main(os.environ["PROBE_MODEL"], a.iters)
        return
    if "MLX_RANK" in os.environ:
        (nccl_main if os.environ.get("PROBE_BACKEND") == "nccl" else rank_main)(a.stage_ms, a.iters)
        return
    hostfile = f"/tmp/probe_overlap_{os.getpid()}.json"
    with open(hostfile, "w") as f:
        json.dump([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]], f)
    if a.model:
        env = {"PROBE_MODEL": a.model, "NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": str(free_port()),
               "MLX_WORLD_SIZE": "2"}
        print(json.dumps({"model": a.model, "ranks": two_ranks(a, env)}, indent=1))
        return
    ring_env = {"MLX_HOSTFILE": hostfile}
    nccl_env = {"PROBE_BACKEND": "nccl", "NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": str(free_port()),
                "MLX_WORLD_SIZE": "2"}
    ranks = two_ranks(a, ring_env)
    if not a.ring_only:
        nccl = two_ranks(a, nccl_env)
        for r, extra in zip(ranks, nccl):
            r.setdefault("rows", {}).update(extra.get("rows", {"nccl": {"error": extra.get("error")}}))
    table = {}
    r0, r1 = ranks
    for v, row in r0.get("rows", {}).items():
        other = r1.get("rows", {}).get(v, {})
        table[v] = {"cycle_ms": row.get("cycle_ms"), "block_ms_r0": row.get("block_ms"),
                    "block_ms_r1": other.get("block_ms"), "wait_ms_r1": other.get("wait_ms"),
                    **({"error": row["error"]} if "error" in row else {})}
    ideal = r0.get("stage_ms", 0) + r1.get("stage_ms", 0)
    print(json.dumps({"stage_ms": [r0.get("stage_ms"), r1.get("stage_ms")],
                      "two_stages_one_gpu_async_ms": r0.get("two_stages_one_gpu_async_ms"),
                      "two_stages_one_gpu_sync_ms": r0.get("two_stages_one_gpu_sync_ms"),
                      "ideal_cycle_ms": ideal + 2 * (table.get("handoff_only", {}).get("cycle_ms") or 0) / 2,
                      "matvecs_per_stage": r0.get("matvecs_per_stage"), "table": table,
                      "ranks": ranks}, indent=1))


if __name__ == "__main__":
    main()
