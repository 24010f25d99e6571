"""Soak: the faults and loads of the reliability issue against a real `mlxdist serve`.

    python tools/soak.py [--model demo] [--ranks 2] [--idle 5000] [--clients 200] [--rounds 3]

Starts `mlxdist serve MODEL --local RANKS` on a free loopback port, then, in order:

1. idle probes: the latency of a short greedy request (the probe) and of /health, and the
   probe's answer (every later probe must give the same text);
2. bad inputs: each must get a 4xx with the API's error JSON, and the next probe must answer
   correctly;
3. disconnect rounds: CLIENTS streaming clients at once that leave mid-stream, ROUNDS times;
   the server's and the ranks' RSS before and after;
4. idle sockets: IDLE connections held open (re-opened as the server closes them at its
   header deadline) while probes and /health are timed;
5. a rank SIGKILLed, then one SIGSTOPped, mid-stream: the stream must finish with the
   uninterrupted text; the time until /health is ok again.

Prints one JSON object (the table of docs/reliability.md). Traffic goes to 127.0.0.1 only;
every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY = "soak-key"
PROBE = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8,
         "temperature": 0}
STORY = {"prompt": "Once upon a time, in a small village by the sea,", "max_tokens": 60, "temperature": 0,
         "stream": True}


class Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.correct = 0
        self.errors: Counter[str] = Counter()
        self.lock = threading.Lock()

    def add(self, ok: bool, kind: str = "") -> None:
        with self.lock:
            self.sent += 1
            self.correct += ok
            if not ok:
                self.errors[kind] += 1


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 300) -> tuple[int, bytes, float]:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                                          **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read(), time.monotonic() - t0
    finally:
        conn.close()


def probe(port: int, model: str) -> tuple[str | None, float]:
    status, data, dt = request(port, "POST", "/v1/chat/completions", json.dumps({**PROBE, "model": model}).encode())
    if status != 200:
        return None, dt
    return json.loads(data)["choices"][0]["message"]["content"], dt


def health(port: int, timeout: float = 10) -> tuple[int, str, float]:
    try:
        status, data, dt = request(port, "GET", "/health", timeout=timeout)
        return status, json.loads(data).get("status", "?"), dt
    except (OSError, http.client.HTTPException, ValueError):
        return 0, "unreachable", timeout


def stream_text(port: int, model: str, on_first=None, leave_after: int | None = None) -> str | None:
    """Stream STORY; call on_first after the first text; with leave_after, close after that
    many chunks (a client leaving mid-stream). None if the stream failed."""
    body = json.dumps({**STORY, "model": model}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        f = sock.makefile("rb")
        status = int(f.readline().split()[1])
        if status != 200:
            return None
        text, chunks, first = "", 0, True
        while line := f.readline():
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                return text
            obj = json.loads(payload)
            if "error" in obj:
                return None
            piece = obj["choices"][0].get("text") or ""
            text += piece
            chunks += 1
            if first and piece and on_first:
                first = False
                on_first()
            if leave_after is not None and chunks >= leave_after:
                return text
        return None
    finally:
        sock.close()


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def worker_pids(server_pid: int) -> dict[int, int]:
    """rank -> pid of the serve process's rank workers."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if b"mlxdist.runtime.worker" in cmd and stat.split(")")[1].split()[3] != "0":
            try:  # the spec comes on stdin: the rank is told by its log, rank<N>.log
                rank = int(os.readlink(d / "fd" / "1").rsplit("rank", 1)[1].split(".")[0])
            except (OSError, ValueError, IndexError):
                continue
            if _descends(int(d.name), server_pid):
                out[rank] = int(d.name)
    return out


def _descends(pid: int, ancestor: int) -> bool:
    for _ in range(10):
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


def pctl(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4) if xs else float("nan")


# ---- phases ------------------------------------------------------------------------------

def bad_inputs(port: int, model: str, answer: str, tally: Tally) -> list[dict]:
    big = json.dumps({"model": model, "prompt": "word " * ((4 << 20) // 5 - 20)}).encode()
    cases = [
        ("top_k over the vocabulary", "POST", "/v1/chat/completions", {**PROBE, "model": model, "top_k": 1 << 20}),
        ("top_k negative", "POST", "/v1/chat/completions", {**PROBE, "model": model, "top_k": -1}),
        ("seed 2**70", "POST", "/v1/chat/completions", {**PROBE, "model": model, "seed": 1 << 70}),
        ("JSON nested 100k deep", "POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000),
        ("invalid JSON", "POST", "/v1/chat/completions", b"{nope"),
        ("not UTF-8", "POST", "/v1/chat/completions", b"\xff\xfe\xfd"),
        ("4 MiB prompt", "POST", "/v1/completions", big),
        ("over 4 MiB body", "POST", "/v1/completions", b" " * ((4 << 20) + 1)),
        ("unknown model", "POST", "/v1/chat/completions", {**PROBE, "model": "gpt-9"}),
        ("empty messages", "POST", "/v1/chat/completions", {"model": model, "messages": []}),
        ("max_tokens 0", "POST", "/v1/chat/completions", {**PROBE, "model": model, "max_tokens": 0}),
        ("n 1000", "POST", "/v1/chat/completions", {**PROBE, "model": model, "n": 1000}),
        ("wrong API key", "POST", "/v1/chat/completions", ("key", {**PROBE, "model": model})),
        ("token ids outside the vocabulary", "POST", "/v1/completions", {"model": model, "prompt": [10 ** 9]}),
    ]
    out = []
    for name, method, path, body in cases:
        headers = None
        if isinstance(body, tuple):
            headers, body = {"Authorization": "Bearer wrong"}, body[1]
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        t0 = time.monotonic()
        try:
            status, data, _ = request(port, method, path, raw, headers)
            try:
                ok_json = "message" in json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                ok_json = False
        except (OSError, http.client.HTTPException) as e:
            status, ok_json = 0, False
            data = str(e).encode()
        dt = time.monotonic() - t0
        good = 400 <= status < 500 and ok_json
        tally.add(good, f"bad input answered {status}")
        text, _ = probe(port, model)
        tally.add(text == answer, "probe after a bad input")
        out.append({"case": name, "status": status, "error_json": ok_json, "seconds": round(dt, 3),
                    "probe_after_ok": text == answer})
    # framing attacks on one raw socket each
    for name, raw in [("two Content-Length values", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: 5\r\nContent-Length: 7\r\n\r\n{}"),
                      ("garbage bytes", b"\x00\x01\x02 garbage\r\n\r\n")]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(raw)
            try:
                head = s.recv(200)
                status = int(head.split()[1]) if head.startswith(b"HTTP/") else 0
            except (OSError, ValueError, IndexError):
                status = 0
        tally.add(400 <= status < 500, f"bad input answered {status}")
        text, _ = probe(port, model)
        tally.add(text == answer, "probe after a bad input")
        out.append({"case": name, "status": status, "probe_after_ok": text == answer})
    return out


def disconnect_rounds(port: int, model: str, clients: int, rounds: int, pids: list[int], tally: Tally) -> dict:
    """A warm-up round first (the prefix cache fills, allocators grow to their working
    size), then ROUNDS measured ones: RSS at the start, after warm-up, after each round."""
    def leave(_: int) -> bool:
        try:
            return stream_text(port, model, leave_after=2) is not None
        except OSError:
            return False

    start = before = rss_mb(pids)
    per_round = []
    for i in range(rounds + 1):
        if i == 1:
            before = rss_mb(pids)
        with ThreadPoolExecutor(clients) as pool:
            started = list(pool.map(leave, range(clients)))
        for ok in started:
            tally.add(ok, "stream refused in disconnect round")
        deadline = time.monotonic() + 120  # the server notices every departure
        while time.monotonic() < deadline:
            status, data, _ = request(port, "GET", "/metrics")
            active = [ln for ln in data.decode().splitlines() if ln.startswith("mlxdist_active_requests ")]
            if active and float(active[0].split()[1]) == 0:
                break
            time.sleep(0.2)
        if i:
            per_round.append(rss_mb(pids))
    after = rss_mb(pids)
    view = json.loads(request(port, "GET", "/v1/cluster")[1])
    kv = sum(n["memory"]["kv_cache"] or 0 for n in view["nodes"])
    return {"clients": clients, "rounds": rounds, "rss_mb_at_start": start, "rss_mb_after_warmup": before,
            "rss_mb_after_each": per_round, "rss_mb_after": after,
            "rss_growth_vs_warmup": round(after / before - 1, 4) if before else None,
            "rss_growth_vs_start": round(after / start - 1, 4) if start else None,
            "kv_caches_held_mb": round(kv / 2**20, 1)}  # the retained prefix caches (GET /v1/cluster)


class IdleHolder:
    """Holds `n` open sockets that never send a byte; re-opens those the server closes."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.sel = selectors.DefaultSelector()
        self.stop = threading.Event()
        self.reopened = 0
        self.refused = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        except OSError:
            self.refused += 1
            return
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ)

    def start(self) -> "IdleHolder":
        for _ in range(self.n):
            self._open()
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.sel.select(0.2):
                s = key.fileobj
                try:
                    data = s.recv(4096)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data or data.startswith(b"HTTP/"):  # closed, or a 503 for over the cap
                    self.sel.unregister(s)
                    s.close()  # type: ignore[union-attr]
                    if not self.stop.is_set():
                        self.reopened += 1
                        self._open()

    @property
    def held(self) -> int:
        return len(self.sel.get_map())

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]


def hold_idle(port: int, n: int, seconds: float) -> None:
    """The holder's own process (`--hold-idle`): its CPU time is not the measurer's.
    Prints how many sockets it held, sampled, and how many it re-opened."""
    holder = IdleHolder(port, n).start()
    print("ready", flush=True)
    held = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        held.append(holder.held)
        time.sleep(0.5)
    holder.close()
    print(json.dumps({"held_min": min(held), "held_mean": round(statistics.mean(held)),
                      "reopened": holder.reopened, "refused": holder.refused}), flush=True)


def idle_sockets(port: int, model: str, n: int, answer: str, idle_probe: list[float], tally: Tally,
                 seconds: float = 30.0) -> dict:
    holder = subprocess.Popen([sys.executable, __file__, "--hold-idle", str(n), "--port", str(port),
                               "--idle-seconds", str(seconds + 5)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
    t_end = time.monotonic() + seconds
    probes, healths = [], []
    while time.monotonic() < t_end:
        status, hs, hdt = health(port)
        healths.append(hdt)
        tally.add(status == 200, f"/health {status} under idle sockets")
        text, dt = probe(port, model)
        probes.append(dt)
        tally.add(text == answer, "probe under idle sockets")
    held = json.loads(holder.stdout.readline())
    holder.wait(30)
    text, _ = probe(port, model)
    tally.add(text == answer, "probe after idle sockets closed")
    return {"idle_sockets": n, "held_min": held["held_min"], "held_mean": held["held_mean"],
            "reopened_after_server_closed": held["reopened"], "probes": len(probes),
            "probe_p50_s": pctl(probes, 0.5), "probe_p99_s": pctl(probes, 0.99),
            "probe_p99_vs_idle_p99": round(pctl(probes, 0.99) / pctl(idle_probe, 0.99), 2),
            "health_max_s": round(max(healths), 3), "probe_after_close_ok": text == answer}


def kill_rank(port: int, model: str, server_pid: int, sig: int, reference: str, tally: Tally) -> dict:
    """Hurt rank 1 right after the stream's first text; meanwhile a watcher polls /health
    every 50 ms: when it first says something else than ok, and when ok again."""
    victim = worker_pids(server_pid)[1]
    when: list[float] = []
    seen: dict[str, float] = {}

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = health(port, timeout=5)[1]
            now = time.monotonic()
            if status != "ok":
                seen.setdefault("not_ok", now)
            elif "not_ok" in seen:
                seen["ok"] = now
                return
            time.sleep(0.05)

    def hurt() -> None:
        when.append(time.monotonic())
        os.kill(victim, sig)
        threading.Thread(target=watch, daemon=True).start()

    text = stream_text(port, model, on_first=hurt)
    done = time.monotonic()
    deadline = time.monotonic() + 120
    while "ok" not in seen and time.monotonic() < deadline:
        time.sleep(0.1)
    healed = seen["ok"] - when[0] if when and "ok" in seen else None
    if sig == signal.SIGSTOP:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    tally.add(text == reference, f"stream across {signal.Signals(sig).name}")
    return {"signal": signal.Signals(sig).name, "same_text_as_uninterrupted": text == reference,
            "health_not_ok_after_s": round(seen["not_ok"] - when[0], 2) if when and "not_ok" in seen else None,
            "service_back_after_s": round(healed, 2) if healed is not None else None,
            "stream_done_after_s": round(done - when[0], 2) if when else None}


def node_flood(held_n: int = 100, clients: int = 26, seconds: float = 15.0) -> dict:
    """`mlxdist node` on loopback with `held_n` unauthenticated sockets held open (10 of
    them stuck in a partial frame): how many of `clients` authenticated coordinators get
    an answer within `seconds`, and how many held sockets the node closed by itself."""
    import re
    import struct
    import tempfile

    sys.path.insert(0, str(ROOT))
    from mlxdist.cluster.client import NodeClient

    work = Path(tempfile.mkdtemp(prefix="mlxdist-soak-node-"))
    secret_file = work / "secret"
    secret_file.write_text(os.urandom(24).hex())
    secret_file.chmod(0o600)
    node = subprocess.Popen([sys.executable, "-m", "mlxdist", "node", "--name", "soak", "--cluster", "soak",
                             "--port", "0", "--bind", "127.0.0.1", "--no-mdns", "--data-dir", str(work / "data"),
                             "--secret-file", str(secret_file)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert node.stderr is not None
        port = 0
        for line in node.stderr:
            if m := re.search(r"on port (\d+);", line):
                port = int(m.group(1))
                break
        threading.Thread(target=node.stderr.read, daemon=True).start()
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(held_n)]
        for s in held[-10:]:
            s.sendall(struct.pack(">I", 100) + b"x" * 10)
        ok, latencies = 0, []
        t_end = time.monotonic() + seconds
        for _ in range(clients):
            if time.monotonic() > t_end:
                break
            t0 = time.monotonic()
            try:
                with NodeClient("127.0.0.1", port, secret_file.read_text().strip().encode(), "soak",
                                timeout=max(0.1, t_end - t0)) as c:
                    ok += c.ping().get("t") == "pong"
                latencies.append(time.monotonic() - t0)
            except (OSError, ValueError, RuntimeError):
                pass
        closed, deadline = 0, time.monotonic() + 15  # the node's handshake deadline is 5 s
        for s in held:
            try:
                while True:  # a refusal frame may come first, then the end
                    s.settimeout(max(0.1, deadline - time.monotonic()))
                    if not s.recv(4096):
                        closed += 1
                        break
            except socket.timeout:
                pass
            except OSError:  # reset: closed too
                closed += 1
            s.close()
        return {"held_unauthenticated": held_n, "authenticated_clients": clients, "answered": ok,
                "latency_p50_s": pctl(latencies, 0.5), "latency_max_s": pctl(latencies, 1.0),
                "held_sockets_closed_by_node": closed}
    finally:
        node.terminate()
        try:
            node.wait(15)
        except subprocess.TimeoutExpired:
            node.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--idle", type=int, default=5000)
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--node-only", action="store_true", help="only the `mlxdist node` flood")
    ap.add_argument("--hold-idle", type=int, default=0, help=argparse.SUPPRESS)  # the holder process
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hold_idle:
        return hold_idle(a.port, a.hold_idle, a.idle_seconds)
    if a.node_only:
        return print(json.dumps(node_flood(), indent=1))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = open(os.devnull, "w")
    server = subprocess.Popen([sys.executable, "-m", "mlxdist", "serve", a.model, "--local", str(a.ranks),
                               "--port", str(port), "--api-key", KEY, "--quiet", "--max-queue",
                               str(a.clients + 16), "--max-connections", str(a.idle + 512)],
                              env=env, stdout=log, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stderr_lines: list[str] = []
    threading.Thread(target=lambda: stderr_lines.extend(server.stderr), daemon=True).start()  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + 600
        while health(port, timeout=2)[1] != "ok":
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start:\n" + "".join(stderr_lines[-20:]))
            time.sleep(0.5)
        status, data, _ = request(port, "GET", "/v1/models")
        model = json.loads(data)["data"][0]["id"]
        tally = Tally()

        answer, _ = probe(port, model)
        idle_probe, idle_health = [], []
        for _ in range(10):
            text, dt = probe(port, model)
            idle_probe.append(dt)
            tally.add(text == answer, "idle probe")
            idle_health.append(health(port)[2])
        reference = stream_text(port, model)
        assert answer and reference, "the model gave no answer"

        out: dict = {"model": model, "ranks": a.ranks, "probe_answer": answer,
                     "idle": {"probe_p50_s": pctl(idle_probe, 0.5), "probe_p99_s": pctl(idle_probe, 0.99),
                              "health_p99_s": pctl(idle_health, 0.99)}}
        out["idle_sockets"] = idle_sockets(port, model, a.idle, answer, idle_probe, tally, a.idle_seconds)
        out["bad_inputs"] = bad_inputs(port, model, answer, tally)
        pids = [server.pid, *worker_pids(server.pid).values()]
        out["disconnects"] = disconnect_rounds(port, model, a.clients, a.rounds, pids, tally)
        out["rank_faults"] = [kill_rank(port, model, server.pid, sig, reference, tally)
                              for sig in (signal.SIGKILL, signal.SIGSTOP)]
        out["node_flood"] = flood = node_flood()
        tally.add(flood["answered"] == flood["authenticated_clients"], "node: coordinators kept out")
        text, _ = probe(port, model)
        tally.add(text == answer, "final probe")
        out["server_alive"] = server.poll() is None
        out["server_log"] = [ln.strip() for ln in stderr_lines if "restart" in ln or "error" in ln.lower()][-20:]
        out["requests"] = {"sent": tally.sent, "answered_correctly": tally.correct, "errors": dict(tally.errors)}
        print(json.dumps(out, indent=1))
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
