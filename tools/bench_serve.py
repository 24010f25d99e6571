"""Serving benchmark: mlxdist's OpenAI server against `mlx_lm.server` on the same weights,
in the same run, at 1, 4, 8 and 16 concurrent streaming clients. Prints one JSON object on
stdout (progress on stderr).

    PYTHONPATH=. python tools/bench_serve.py [MODEL_DIR] [--clients 1,4,8,16] [--max-tokens 32]
        [--ranks 1,2] [--busy-streams 8] [--busy-tokens 400] [--probes 3] [--concurrency N]
        [--no-mlx-lm] [--no-pipeline] [--no-prompt-cache-row] [--no-busy] [--repeat-questions]

MODEL_DIR is an mlx-lm model directory (mlx_lm.server needs one); mlxdist serves the same
directory. Without it a random float32 llama is written with tools/tiny_models.py
(--tiny-hidden, --tiny-layers; its head limited to printable ASCII, so that every token is
visible text and no request stops early) so that the script runs anywhere in a few minutes.

Both servers are started so that they can batch: mlx_lm.server with `--decode-concurrency`
and `--prompt-concurrency` at least the most clients at once (its BatchGenerator decodes that
many requests together; the defaults are 32 and 8), mlxdist with `--concurrency` (its batch width) at least
as many.

For each server and client count: time to first token (mean, p50, max; the first non-empty
text delta, as `ChatClient` times it), per-request decode tok/s (mean) and aggregate tok/s
(all completion tokens / wall time), and against mlx_lm.server (one rank) measured in this
run: `aggregate_vs_mlx_lm` (ours / theirs), `ttft_p50_vs_mlx_lm` and `ttft_vs_mlx_lm` (mean).
Every client is a distinct user: its question carries a tag of its own (`(user 8.3) Name a
fruit.`), so no request finds its whole prompt in a prompt cache (`--repeat-questions`: the
bare questions, which repeat). Every request shares the chat template's prefix (the system
prompt), which both servers' prompt caches reuse, each holding `--prompt-cache` (10, mlx_lm.server's default) KV
caches; one more row runs mlxdist on one rank with `--prompt-cache 0` to show what its
prefix cache is worth.

`busy_ttft` (each server but the prompt-cache-0 and pipeline rows): the TTFT of a new
request (a prompt of its own, ~25 words, `--probe-tokens` long answer) sent while
`--busy-streams` other requests decode (each has had its first token; they ask for
`--busy-tokens` tokens and are cancelled, their connections closed, after the last probe),
against the same kind of request on the idle server: medians of `--probes` requests each
way, one after the other, `ratio` = busy / idle (target for mlxdist: <= 1.5).
Every probe is sent while all background streams decode (probing stops when one has
ended); `background_decoding` counts, per probe, those still decoding when the probe's
first token came (fewer: the probe waited for a slot that a finished stream freed). A
probe that has no token after --probe-timeout seconds is given up and counted as that long
(`busy_timed_out`; the ratio is then a lower bound), e.g. when every slot is taken and
the background would hold them for --busy-tokens.

`ratios` at the top collects the headline numbers of mlxdist on one rank against
mlx_lm.server: aggregate and TTFT p50 per client count, and both servers' busy/idle ratio.

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
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from mlxdist.chat.client import Answer, ChatClient, ChatError, note  # noqa: E402
from mlxdist.errors import UserError  # noqa: E402

QUESTIONS = ["Name a colour.", "Count to five.", "Say hello.", "Name a fruit.", "Name an animal.",
             "Name a city.", "Name a number.", "Name a planet."]
# the background of the busy-TTFT test: answers that go on for a while on a real model
LONG_QUESTIONS = ["Count from 1 to 300, one number per line.", "List 200 animals, one per line.",
                  "Write a long story about the sea.", "List 200 cities, one per line.",
                  "Write a long poem about the mountains.", "List 200 fruits, one per line.",
                  "Count from 500 to 800, one number per line.", "Write a long essay about rivers."]
# the probe: its own words first, so that no prompt cache holds more than the template prefix
PROBE_TEXT = ("answer in one word: the quick brown fox jumps over the lazy dog while the slow "
              "green turtle walks along the river bank")


def ascii_only(model_dir: Path) -> None:
    """Zero the head's rows of every token but the printable ASCII bytes (tools/tiny_models.py's
    token i is byte i): the random model then writes one visible character per token and never
    EOS, so both servers stream text from the first token on (their TTFT is the first
    non-empty text) and every request decodes max_tokens."""
    import mlx.core as mx

    for f in model_dir.glob("model*.safetensors"):
        weights = mx.load(str(f))
        if "lm_head.weight" in weights:
            head = weights["lm_head.weight"]
            keep = mx.array([1.0 if 32 <= i < 127 else 0.0 for i in range(head.shape[0])], dtype=head.dtype)
            weights["lm_head.weight"] = head * keep[:, None]
            mx.save_safetensors(str(f), weights, metadata={"format": "mlx"})
            return
    raise RuntimeError(f"{model_dir}: no lm_head.weight")


def log(*a: object) -> None:
    print("[bench_serve]", *a, file=sys.stderr, flush=True)


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
            "start": answer.started, "first": answer.first_token, "end": answer.ended}


def question(clients: int, i: int, repeat: bool) -> str:
    """Client i's question at this client count: distinct users (a tag of their own before a
    shared question, so no request finds its whole prompt in a prompt cache: only the chat
    template's system prompt is shared), or with `repeat` the bare question (the same few
    repeat within and across client counts, and whole-prompt cache hits make TTFT bimodal)."""
    q = QUESTIONS[i % len(QUESTIONS)]
    return q if repeat else f"(user {clients}.{i}) {q}"


def measure(url: str, clients: int, max_tokens: int, repeat: bool = False) -> dict:
    one_request(url, "Warm up.", 4)
    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(url, question(clients, i, repeat), max_tokens),
                                 range(clients)))
    wall = time.monotonic() - t0
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    rates = [r["tok_s"] for r in results if r["tok_s"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "ttft_mean_s": statistics.mean(ttfts), "ttft_p50_s": statistics.median(ttfts),
            "ttft_max_s": max(ttfts), "per_request_tok_s": statistics.mean(rates) if rates else None,
            "aggregate_tok_s": tokens / wall, "tokens": tokens, "wall_s": wall}


def _background(client: ChatClient, question: str, max_tokens: int, answer: Answer, errors: list[str],
                stopping: threading.Event) -> None:
    """One streaming request whose Answer the caller watches as it fills in; the caller ends
    it by closing `client` (both servers cancel a request whose client went away)."""
    try:
        for d in client.stream_chat([{"role": "user", "content": question}], temperature=0.0,
                                    max_tokens=max_tokens):
            note(answer, d)
    except Exception as e:  # a close() from the caller breaks the read in any of several ways
        if not stopping.is_set():
            errors.append(f"{type(e).__name__}: {e}")
    answer.ended = time.monotonic()


def probe_request(url: str, question: str, max_tokens: int, timeout: float) -> dict:
    """one_request's figures for a request that is given up (its connection closed) when no
    token came within `timeout` seconds: its ttft is then None and `timed_out` true."""
    answer, errors, stopping = Answer(), [], threading.Event()
    client = ChatClient(url, timeout=600)
    t = threading.Thread(target=_background, args=(client, question, max_tokens, answer, errors, stopping),
                         daemon=True)
    t.start()
    t.join(timeout)
    timed_out = t.is_alive() and answer.first_token is None
    if timed_out:
        stopping.set()
        client.close()
    t.join(timeout + 60)
    if errors:
        raise ChatError(errors[0])
    return {"ttft": answer.ttft, "tokens": answer.completion_tokens, "start": answer.started,
            "first": answer.first_token, "end": answer.ended, "timed_out": timed_out}


def busy_ttft(url: str, args) -> dict:
    """TTFT of a new request while `busy_streams` others decode, against the idle server.
    The background requests ask for --busy-tokens and are cancelled (their connections
    closed) once the probes are done."""
    n = args.probes
    probe = lambda i: f"Request {i}: {PROBE_TEXT}"  # noqa: E731
    one_request(url, probe(999), args.probe_tokens)  # warm-up (and the template prefix cached)
    idle = [one_request(url, probe(i), args.probe_tokens) for i in range(n)]
    answers = [Answer() for _ in range(args.busy_streams)]
    clients = [ChatClient(url, timeout=600) for _ in answers]
    errors: list[str] = []
    stopping = threading.Event()
    threads = [threading.Thread(target=_background, daemon=True,
                                args=(c, LONG_QUESTIONS[i % len(LONG_QUESTIONS)], args.busy_tokens, ans, errors,
                                      stopping))
               for i, (c, ans) in enumerate(zip(clients, answers))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    while not all(a.first_token or a.ended for a in answers) and time.monotonic() - t0 < 600:
        time.sleep(0.005)
    all_decoding_after = time.monotonic() - t0
    busy = []
    for i in range(n):
        at_send = sum(1 for a in answers if a.ended is None)
        if errors or at_send < len(answers):  # the background ran out (--busy-tokens): no longer busy
            break
        busy.append(probe_request(url, probe(n + i), args.probe_tokens, args.probe_timeout))
        # background streams still decoding when this probe's first token came
        first = busy[-1]["first"] or busy[-1]["end"]
        busy[-1]["background_decoding"] = sum(1 for a in answers if a.ended is None or a.ended > first)
        if busy[-1]["timed_out"]:
            break
    stopping.set()
    for c in clients:
        c.close()
    for t in threads:
        t.join(120)
    time.sleep(1.0)  # the servers notice the closed connections at their next write
    if errors:
        return {"error": errors[0]}
    if not busy:
        return {"error": "the background streams had ended before the first probe (raise --busy-tokens)"}
    idle_ttft = statistics.median(r["ttft"] for r in idle if r["ttft"] is not None)
    # a probe given up after --probe-timeout counts as that long (a lower bound)
    busy_ttft_ = statistics.median(args.probe_timeout if r["timed_out"] else r["ttft"] for r in busy
                                   if r["ttft"] is not None or r["timed_out"])
    return {"busy_streams": args.busy_streams, "idle_ttft_p50_s": idle_ttft, "busy_ttft_p50_s": busy_ttft_,
            "ratio": busy_ttft_ / idle_ttft, "idle_ttft_s": [r["ttft"] for r in idle],
            "busy_ttft_s": [r["ttft"] for r in busy],
            "busy_timed_out": any(r["timed_out"] for r in busy),
            "background_decoding": [r["background_decoding"] for r in busy],
            "background_tokens_at_cancel": [a.completion_tokens for a in answers],
            "background_all_decoding_after_s": all_decoding_after}


def run_server(name: str, cmd: list[str], port: int, args, env: dict | None = None, busy: bool = False) -> dict:
    url = f"http://127.0.0.1:{port}"
    log(f"{name}: starting")
    proc = start(cmd, env)
    try:
        wait_ready(url, proc)
        out: dict = {"server": name, "command": " ".join(cmd[1:]), "runs": []}
        for c in args.clients:
            out["runs"].append(measure(url, c, args.max_tokens, args.repeat_questions))
            log(f"{name}: {c} clients {out['runs'][-1]['aggregate_tok_s']:.1f} tok/s, "
                f"TTFT p50 {out['runs'][-1]['ttft_p50_s']:.3f} s")
        if busy and args.busy_streams:
            out["busy_ttft"] = busy_ttft(url, args)
            log(f"{name}: busy/idle TTFT {out['busy_ttft'].get('ratio')}")
        return out
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


def headline(report: dict) -> dict:
    """mlxdist on one rank against mlx_lm.server, per client count, and both busy ratios."""
    by = {r["server"]: r for r in report["results"]}
    ours, theirs = by.get("mlxdist serve --local 1", {}), by.get("mlx_lm.server", {})
    out: dict = {}
    for run in ours.get("runs", []):
        c = run["clients"]
        if "aggregate_vs_mlx_lm" in run:
            out[f"mlxdist_1rank_C{c}_aggregate_vs_mlx_lm"] = run["aggregate_vs_mlx_lm"]
            out[f"mlxdist_1rank_C{c}_ttft_p50_vs_mlx_lm"] = run["ttft_p50_vs_mlx_lm"]
    for key, r in (("mlxdist_1rank", ours), ("mlx_lm", theirs)):
        ratio = r.get("busy_ttft", {}).get("ratio")
        if ratio is not None:
            out[f"{key}_busy_ttft_vs_idle"] = ratio
    if "mlxdist_1rank_busy_ttft_vs_idle" in out:
        out["mlxdist_busy_ttft_target_le_1_5_met"] = out["mlxdist_1rank_busy_ttft_vs_idle"] <= 1.5
    return out


def main() -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="What is measured: see the module docstring (head tools/bench_serve.py).")
    p.add_argument("model", type=Path, nargs="?", default=None,
                   help="an mlx-lm model directory (default: a random tiny llama, tools/tiny_models.py)")
    p.add_argument("--clients", default="1,4,8,16", type=ints, help="concurrent clients per run")
    p.add_argument("--ranks", default="1,2", type=ints, help="mlxdist rows: `serve --local N` for each N")
    p.add_argument("--max-tokens", default=32, type=int)
    p.add_argument("--concurrency", default=0, type=int,
                   help="mlxdist serve --concurrency (its batch width), and mlx_lm.server's decode/prompt concurrency "
                        "(default: max(most clients, busy streams + 1))")
    p.add_argument("--busy-streams", default=8, type=int, help="background streams of the busy-TTFT test (0: skip)")
    p.add_argument("--busy-tokens", default=400, type=int,
                   help="max_tokens of each background stream (they are cancelled once the probes are done)")
    p.add_argument("--probes", default=3, type=int, help="probe requests idle and busy (medians)")
    p.add_argument("--probe-tokens", default=4, type=int, help="max_tokens of each probe request")
    p.add_argument("--probe-timeout", default=60, type=float,
                   help="seconds a busy probe may wait for its first token before it is given up (and "
                        "counted as that long: the ratio is then a lower bound)")
    p.add_argument("--tiny-hidden", default=256, type=int, help="without MODEL_DIR: the random llama's width")
    p.add_argument("--tiny-layers", default=6, type=int, help="without MODEL_DIR: its layers")
    p.add_argument("--no-mlx-lm", action="store_true")
    p.add_argument("--no-pipeline", action="store_true")
    p.add_argument("--no-prompt-cache-row", action="store_true")
    p.add_argument("--prompt-cache", default=10, type=int,
                   help="KV caches each server keeps for prefix reuse (mlx_lm.server's --prompt-cache-size, "
                        "mlxdist's --prompt-cache): the same on both sides, mlx-lm's default")
    p.add_argument("--no-busy", action="store_true", help="skip the busy-TTFT test")
    p.add_argument("--repeat-questions", action="store_true",
                   help="the bare questions, repeating within and across client counts (before 2026-12-03, third "
                        "session, always so: whole-prompt cache hits made TTFT bimodal); default: distinct users")
    args = p.parse_args()
    if args.no_busy:
        args.busy_streams = 0
    if args.model is None:
        from tiny_models import make_tiny_model

        args.model = make_tiny_model(Path(tempfile.mkdtemp(prefix="bench_serve-")) / "tiny-llama", "llama",
                                     args.tiny_layers, args.tiny_hidden)
        ascii_only(args.model)
        log(f"wrote a random llama ({args.tiny_layers} layers, hidden {args.tiny_hidden}) to {args.model}")
    py = sys.executable
    slots = args.concurrency or max(max(args.clients), args.busy_streams + 1)
    ours_extra = ["--concurrency", str(slots)]
    # the same prompt-cache capacity on both sides: mlx_lm.server keeps 10 KV caches
    # (--prompt-cache-size), `mlxdist serve` 4 unless told
    cached = ["--prompt-cache", str(args.prompt_cache)]
    report: dict = {"model": str(args.model), "max_tokens": args.max_tokens, "machine": os.uname().machine,
                    "cpus": os.cpu_count(), "clients": args.clients,
                    "mlx_lm_concurrency": {"decode": max(32, slots), "prompt": slots},
                    "mlxdist_concurrency": slots, "prompt_cache_size": args.prompt_cache,
                    "results": []}
    mlx_lm_cmd = [py, "-m", "mlx_lm", "server", "--model", str(args.model),
                  "--decode-concurrency", str(max(32, slots)), "--prompt-concurrency", str(slots),
                  "--prompt-cache-size", str(args.prompt_cache)]
    if not args.no_mlx_lm:
        port = free_port()
        report["results"].append(run_server("mlx_lm.server", [*mlx_lm_cmd, "--port", str(port)], port, args,
                                            busy=True))
    for ranks in args.ranks:
        port = free_port()
        report["results"].append(run_server(f"mlxdist serve --local {ranks}", [
            py, "-m", "mlxdist", "serve", str(args.model), "--port", str(port), "--local", str(ranks), "--quiet",
            *ours_extra, *cached], port, args, busy=True))
    if not args.no_prompt_cache_row:
        port = free_port()
        report["results"].append(run_server("mlxdist serve --local 1 --prompt-cache 0", [
            py, "-m", "mlxdist", "serve", str(args.model), "--port", str(port), "--local", "1", "--quiet",
            "--prompt-cache", "0", *ours_extra], port, args))
    if not args.no_pipeline and not args.no_mlx_lm:
        why = pipeline_support(args.model)
        if why:
            report["results"].append({"server": "mlx_lm.server --pipeline (2 ranks)", "skipped": why})
        else:
            port = free_port()
            launch = [str(Path(py).parent / "mlx.launch"), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
                      "--starting-port", str(free_port()), "--", *mlx_lm_cmd, "--port", str(port), "--pipeline"]
            report["results"].append(run_server("mlx_lm.server --pipeline (2 ranks)", launch, port, args))
    base = next((r for r in report["results"] if r["server"] == "mlx_lm.server" and "runs" in r), None)
    if base:
        ref = {run["clients"]: run for run in base["runs"]}
        for r in report["results"]:
            for run in r.get("runs", []):
                theirs = ref.get(run["clients"])
                if theirs:
                    run["aggregate_vs_mlx_lm"] = run["aggregate_tok_s"] / theirs["aggregate_tok_s"]
                    run["ttft_p50_vs_mlx_lm"] = run["ttft_p50_s"] / theirs["ttft_p50_s"]
                    run["ttft_vs_mlx_lm"] = run["ttft_mean_s"] / theirs["ttft_mean_s"]
    report["ratios"] = headline(report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
