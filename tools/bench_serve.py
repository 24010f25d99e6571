"""Serving benchmark: mlxdist's OpenAI server against `mlx_lm.server` on the same weights,
in the same run, at 1, 4 and 8 concurrent streaming clients. Prints JSON.

    PYTHONPATH=. python tools/bench_serve.py MODEL_DIR [--clients 1,4,8] [--max-tokens 32]
        [--ranks 1,2] [--no-mlx-lm] [--no-pipeline] [--no-prompt-cache-row]

MODEL_DIR is an mlx-lm model directory (mlx_lm.server needs one); mlxdist serves the same
directory. For each server and client count: time to first token (mean, p50, max), per-
request decode tok/s (mean) and aggregate tok/s (all tokens / wall time), and the ratio of
mlxdist's aggregate tok/s to mlx_lm.server's (one rank) measured in this run. Every
request shares the chat template's prefix (the system prompt), which both servers' prompt
caches reuse; one more row runs mlxdist on one rank with `--prompt-cache 0` to show what
its prefix cache is worth.

mlx-lm's `--pipeline` mode (under `mlx.launch`, ring backend, 2 ranks on 127.0.0.1) only
exists for some architectures (deepseek_v2/v3, qwen2, qwen3_moe, ...): for others (llama,
SmolLM2) the JSON says why it was skipped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlxdist.chat.client import ChatClient, ChatError  # noqa: E402
from mlxdist.errors import UserError  # noqa: E402

QUESTIONS = ["Name a colour.", "Count to five.", "Say hello.", "Name a fruit.", "Name an animal.",
             "Name a city.", "Name a number.", "Name a planet."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Both servers answer GET /health once loaded (mlx_lm.server's /v1/models scans the
    Hugging Face cache, so it is not used; requests leave `model` out: both servers then
    use the one they serve)."""
    client = ChatClient(url)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if client.get_json("/health").get("status") == "ok":
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not come up")


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})), start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(20)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            os.killpg(proc.pid, 9)
            proc.wait()


def one_request(url: str, question: str, max_tokens: int) -> dict:
    answer = ChatClient(url, timeout=300).ask([{"role": "user", "content": question}], temperature=0.0,
                                              max_tokens=max_tokens)
    return {"ttft": answer.ttft, "tokens": answer.completion_tokens, "tok_s": answer.tokens_per_second,
            "start": answer.started, "end": answer.ended}


def measure(url: str, clients: int, max_tokens: int) -> dict:
    one_request(url, "Warm up.", 4)
    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(url, QUESTIONS[i % len(QUESTIONS)], max_tokens),
                                 range(clients)))
    wall = time.monotonic() - t0
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    rates = [r["tok_s"] for r in results if r["tok_s"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "ttft_mean_s": statistics.mean(ttfts), "ttft_p50_s": statistics.median(ttfts),
            "ttft_max_s": max(ttfts), "per_request_tok_s": statistics.mean(rates) if rates else None,
            "aggregate_tok_s": tokens / wall, "tokens": tokens, "wall_s": wall}


def run_server(name: str, cmd: list[str], port: int, args, env: dict | None = None) -> dict:
    url = f"http://127.0.0.1:{port}"
    proc = start(cmd, env)
    try:
        wait_ready(url, proc)
        return {"server": name, "runs": [measure(url, c, args.max_tokens) for c in args.clients]}
    except (RuntimeError, ChatError, OSError, UserError) as e:
        err = proc.stderr.read()[-800:] if proc.poll() is not None and proc.stderr else ""
        return {"server": name, "error": f"{e} {err}".strip()}
    finally:
        stop(proc)


def pipeline_support(model_dir: Path) -> str | None:
    """None when mlx-lm can pipeline this architecture, else why not."""
    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError:
        return f"mlx-lm has no model {model_type}"
    inner = [v for v in vars(module).values() if isinstance(v, type) and hasattr(v, "pipeline")]
    return None if inner else f"mlx-lm's {model_type} has no pipeline() (only some architectures do)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--clients", default="1,4,8", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--ranks", default="1,2", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--max-tokens", default=32, type=int)
    p.add_argument("--no-mlx-lm", action="store_true")
    p.add_argument("--no-pipeline", action="store_true")
    p.add_argument("--no-prompt-cache-row", action="store_true")
    args = p.parse_args()
    py = sys.executable
    report: dict = {"model": str(args.model), "max_tokens": args.max_tokens, "machine": os.uname().machine,
                    "cpus": os.cpu_count(), "results": []}
    if not args.no_mlx_lm:
        port = free_port()
        report["results"].append(run_server("mlx_lm.server", [py, "-m", "mlx_lm", "server", "--model",
                                                              str(args.model), "--port", str(port)], port, args))
    for ranks in args.ranks:
        port = free_port()
        report["results"].append(run_server(f"mlxdist serve --local {ranks}", [
            py, "-m", "mlxdist", "serve", str(args.model), "--port", str(port), "--local", str(ranks), "--quiet"],
            port, args))
    if not args.no_prompt_cache_row:
        port = free_port()
        report["results"].append(run_server("mlxdist serve --local 1 --prompt-cache 0", [
            py, "-m", "mlxdist", "serve", str(args.model), "--port", str(port), "--local", "1", "--quiet",
            "--prompt-cache", "0"], port, args))
    if not args.no_pipeline and not args.no_mlx_lm:
        why = pipeline_support(args.model)
        if why:
            report["results"].append({"server": "mlx_lm.server --pipeline (2 ranks)", "skipped": why})
        else:
            port = free_port()
            launch = [str(Path(py).parent / "mlx.launch"), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
                      "--starting-port", str(free_port()), "--", py, "-m", "mlx_lm", "server", "--model",
                      str(args.model), "--port", str(port), "--pipeline"]
            report["results"].append(run_server("mlx_lm.server --pipeline (2 ranks)", launch, port, args))
    base = next((r for r in report["results"] if r["server"] == "mlx_lm.server" and "runs" in r), None)
    if base:
        for r in report["results"]:
            for run, ref in zip(r.get("runs", []), base["runs"]):
                run["aggregate_vs_mlx_lm"] = run["aggregate_tok_s"] / ref["aggregate_tok_s"]
                run["ttft_vs_mlx_lm"] = run["ttft_mean_s"] / ref["ttft_mean_s"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
