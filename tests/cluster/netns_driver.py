"""Coordinator-side actions run inside a test namespace by test_cluster_netns.py:
    python tests/cluster/netns_driver.py COMMAND 'JSON ARGS'
Prints JSON lines. Finds nodes by mDNS only (never told their addresses), except
`status`, which asks the nodes at the given `hosts` directly."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlxdist.cluster.nodes import deliver, discover_nodes  # noqa: E402
from mlxdist.cluster.health import Monitor  # noqa: E402
from mlxdist.cluster.secret import load_secret  # noqa: E402


_out_lock = threading.Lock()


def out(obj: object) -> None:
    with _out_lock:  # heartbeat threads report at once: keep lines whole
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def nodes(a: dict) -> list:
    secret, _ = load_secret(Path(a["secret_file"]), create=False)
    return discover_nodes(a["cluster"], secret, browse_s=a.get("browse", 5.0),
                          mdns_addresses=[a["address"]], expect=a.get("expect")), secret


def serve(a: dict) -> None:
    """A ClusterEngine over the nodes found by mDNS (running `plan`, a plan file, when
    given), one greedy request; with
    `progress_at`, a line is printed when that many tokens have come (the test then
    cuts something), and the request runs on through any re-placement."""
    from mlxdist.cluster.coordinator import open_cluster_engine
    from mlxdist.runtime.api import GenerationRequest
    from mlxdist.runtime.config import EngineConfig

    # what `mlxdist serve OUT --nodes auto` calls (mDNS bound to our namespace address)
    engine = open_cluster_engine(a["out"], "auto", a["cluster"], a["secret_file"],
                                 browse_s=3.0, mdns_addresses=[a["address"]], plan=a.get("plan"),
                                 config=EngineConfig(startup_timeout_s=60))
    try:
        out({"placement": [v.name for v in engine.placement]})
        for round_ in range(a.get("rounds", 1)):
            t0 = time.perf_counter()
            handle = engine.submit(GenerationRequest(tuple(a["prompt"]), a["max_tokens"]))
            tokens, error = [], None
            for ev in handle:
                if ev.token is not None:
                    tokens.append(ev.token)
                    if len(tokens) == a.get("progress_at"):
                        out({"progress": len(tokens), "time": time.time()})
                error = ev.error or error
            dt = time.perf_counter() - t0
            out({"tokens": tokens, "error": error, "seconds": round(dt, 3),
                 "tok_per_s": round(len(tokens) / dt, 2), "recoveries": engine.recoveries,
                 "placement": [v.name for v in engine.placement]})
            if a.get("pause_between") and round_ + 1 < a.get("rounds", 1):
                sys.stdin.readline()  # the test changes the links, then says go on
                if a.get("wait_for_home"):  # until the engine has taken the nodes back
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline and [
                            v.name for v in engine.placement] != a["names"]:
                        time.sleep(0.2)
    finally:
        engine.close()


def main() -> None:
    cmd, a = sys.argv[1], json.loads(sys.argv[2])
    if cmd == "serve":
        serve(a)
        return
    if cmd == "status":
        from mlxdist.cluster.nodes import query_nodes

        secret, _ = load_secret(Path(a["secret_file"]), create=False)
        views = query_nodes([([h], a.get("port", 52415), "", h) for h in a["hosts"]],
                            a["cluster"], secret)
        out([{"name": v.name, "health": v.health, "peers": list(v.peers)} for v in views])
        return
    views, secret = nodes(a)
    by_name = {v.name: v for v in views}
    if cmd == "discover":
        out([{"name": v.name, "health": v.health, "host": v.host, "shards": list(v.shards),
              "peers": list(v.peers), "role": v.role, "error": v.error} for v in views])
    elif cmd == "deliver":
        for path, model, stage, name in a["items"]:
            t0 = time.perf_counter()
            [d] = deliver(by_name, {name: [(Path(path), model, stage)]}, a["cluster"], secret)
            out({"node": name, "stage": stage, "bytes": d.bytes_sent, "skipped": d.skipped,
                 "seconds": round(time.perf_counter() - t0, 3)})
    elif cmd == "monitor":
        names = {v.node_id: v.name for v in views}
        mon = Monitor(secret, a["cluster"], on_change=lambda nid, state: out(
            {"node": names[nid], "state": state, "time": time.time()}))
        for v in views:
            mon.watch(v.node_id, [v.host], v.port)
        time.sleep(a["seconds"])
        mon.close()


if __name__ == "__main__":
    main()
