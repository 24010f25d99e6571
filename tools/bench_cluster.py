#!/usr/bin/env python3
"""What link speed costs: shard delivery time and decode tok/s across 3 network
namespaces (tools/netns.py), with `tc tbf` rate limits on one node's link, against the
unlimited link in the same run. Needs root. Prints JSON.

    sudo python tools/bench_cluster.py [--hidden 256] [--tokens 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tests" / "cluster"), str(ROOT)]

import netns  # noqa: E402
from cluster_fixtures import make_shards  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

DRIVER = str(ROOT / "tests" / "cluster" / "netns_driver.py")
CLUSTER = "bench"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=40)
    a = p.parse_args()
    if netns.available():
        sys.exit(f"bench_cluster: {netns.available()}")
    tmp = Path(tempfile.mkdtemp(prefix="mlxdist-bench-cluster-"))
    secret = tmp / "secret"
    secret.write_text("b" * 64)
    secret.chmod(0o600)
    model = make_tiny_model(tmp / "tiny", "llama", layers=6, hidden=a.hidden)
    out = make_shards(model, tmp / "out", [2, 2, 2])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result: dict = {"hidden": a.hidden, "tokens": a.tokens,
                    "hidden_bytes_per_token_per_hop": a.hidden * 4}
    with netns.TestNet(3) as net:
        procs = [net.popen(i, [sys.executable, "-m", "mlxdist", "node", "--name", f"n{i}",
                               "--cluster", CLUSTER, "--data-dir", str(tmp / f"d{i}"),
                               "--secret-file", str(secret), "--address", h.ip],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for i, h in enumerate(net.hosts)]
        try:
            base = {"cluster": CLUSTER, "secret_file": str(secret), "address": net.hosts[0].ip,
                    "expect": 3}

            def driver(cmd: str, **args) -> list:
                r = net.run(0, [sys.executable, DRIVER, cmd, json.dumps({**base, **args})],
                            env=env, timeout=300)
                if r.returncode:
                    sys.exit(r.stderr[-2000:])
                return [json.loads(x) for x in r.stdout.splitlines() if x.strip()]

            # shard delivery of stage 1 to n1 at each rate (a new model name each time)
            delivery = []
            for i, rate in enumerate([None, "100mbit", "20mbit"]):
                if rate:
                    net.rate_limit(1, rate, burst="256kb")
                [d] = driver("deliver", items=[[str(out / "stages" / "1"), f"r{i}", 1, "n1"]])
                net.clear_rate_limit(1)
                delivery.append({"rate": rate or "unlimited", "bytes": d["bytes"],
                                 "seconds": d["seconds"],
                                 "mbit_per_s": round(d["bytes"] * 8 / d["seconds"] / 1e6, 1)})
            for d in delivery:
                d["time_ratio"] = round(d["seconds"] / delivery[0]["seconds"], 2)
            result["shard_delivery"] = delivery

            # decode over the ring with n1's link limited (two hops cross it per token)
            # the first round warms up (compiles, fills caches) and is not reported
            rates = [None, None, "1mbit", "128kbit", "64kbit"]
            args = {**base, "names": ["n0", "n1", "n2"], "out": str(out), "model": "tiny",
                    "prompt": [5, 17, 99, 3], "max_tokens": a.tokens, "rounds": len(rates),
                    "pause_between": True}
            serve = net.popen(0, [sys.executable, DRIVER, "serve", json.dumps(args)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            serve.stdout.readline()  # placement
            decode = []
            for i, rate in enumerate(rates):
                if i:
                    net.clear_rate_limit(1)
                    if rate:
                        net.rate_limit(1, rate, burst="3kb", latency="500ms")
                    serve.stdin.write("go\n")
                    serve.stdin.flush()
                r = json.loads(serve.stdout.readline())
                if i == 0:
                    continue
                decode.append({"rate": rate or "unlimited", "tok_per_s": r["tok_per_s"],
                               "tokens": len(r["tokens"])})
            net.clear_rate_limit(1)
            serve.wait(timeout=60)
            for d in decode:
                d["ratio"] = round(d["tok_per_s"] / decode[0]["tok_per_s"], 3)
                d["ms_per_token_added"] = round(1000 / d["tok_per_s"] - 1000 / decode[0]["tok_per_s"], 2)
                bits = {"1mbit": 1e6, "128kbit": 128e3, "64kbit": 64e3}.get(d["rate"])
                if bits:  # the hidden state alone, once each way through the limited link
                    d["ms_hidden_state_at_rate"] = round(a.hidden * 4 * 8 / bits * 1000, 2)
            result["decode"] = decode
        finally:
            for pr in procs:
                pr.terminate()
            for pr in procs:
                try:
                    pr.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pr.kill()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
