"""`mlxdist node` and `mlxdist cluster` as a user runs them (loopback only, no mDNS)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_fixtures import run_mlxdist, stop_process

ROOT = Path(__file__).resolve().parents[2]


def start_node(tmp_path: Path, secret: Path, *extra: str) -> tuple[subprocess.Popen, int, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "mlxdist", "node", "--name", "solo", "--cluster",
                          "c1", "--port", "0", "--bind", "127.0.0.1", "--no-mdns",
                          "--data-dir", str(tmp_path / "data"), "--secret-file", str(secret),
                          *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"on port (\d+);", line)
        if m:
            return p, int(m.group(1)), "".join(lines)
    p.kill()
    raise AssertionError("node did not start: " + "".join(lines))


stop = stop_process


def test_node_creates_secret_then_cluster_lists_it(tmp_path):
    secret = tmp_path / "cfg" / "secret"
    p, port, startup = start_node(tmp_path, secret)
    assert secret.read_text().strip() in startup  # printed once, at creation
    try:
        assert secret.exists() and (secret.stat().st_mode & 0o777) == 0o600
        r = run_mlxdist("cluster", "--cluster", "c1", "--secret-file", str(secret), "--no-mdns",
                        "--node", f"127.0.0.1:{port}", "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        [n] = json.loads(r.stdout)["nodes"]
        assert (n["name"], n["health"], n["role"]) == ("solo", "ok", "idle")
        r = run_mlxdist("cluster", "--cluster", "c1", "--secret-file", str(secret), "--no-mdns",
                        "--node", f"127.0.0.1:{port}", timeout=60)
        assert r.stdout.split("\n")[1].split()[0] == "solo"
        wrong = tmp_path / "wrong"
        wrong.write_text("x" * 64)
        wrong.chmod(0o600)
        r = run_mlxdist("cluster", "--cluster", "c1", "--secret-file", str(wrong), "--no-mdns",
                        "--node", f"127.0.0.1:{port}", "--json", timeout=60)
        assert json.loads(r.stdout)["nodes"][0]["health"] == "refused"
    finally:
        stop(p)
    p2, _, startup2 = start_node(tmp_path, secret)
    stop(p2)
    assert secret.read_text().strip() not in startup2 + p2.stderr.read()  # and never again


def test_secret_readable_by_others_is_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s" * 64)
    secret.chmod(0o644)
    r = run_mlxdist("cluster", "--secret-file", str(secret), "--no-mdns", timeout=60)
    assert r.returncode == 2 and "chmod 600" in r.stderr and "Traceback" not in r.stderr


def test_missing_secret_and_bad_node_are_one_line_errors(tmp_path):
    r = run_mlxdist("cluster", "--secret-file", str(tmp_path / "none"), "--no-mdns", timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("mlxdist: error: no cluster secret")
    secret = tmp_path / "s"
    secret.write_text("s" * 64)
    secret.chmod(0o600)
    r = run_mlxdist("cluster", "--secret-file", str(secret), "--no-mdns", "--node", "nohost",
                    timeout=60)
    assert r.returncode == 2 and "HOST:PORT" in r.stderr and "Traceback" not in r.stderr


def test_port_in_use_is_a_one_line_error(tmp_path):
    import socket

    secret = tmp_path / "s"
    secret.write_text("s" * 64)
    secret.chmod(0o600)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = run_mlxdist("node", "--no-mdns", "--bind", "127.0.0.1", "--port", str(port),
                        "--secret-file", str(secret), "--data-dir", str(tmp_path / "d"),
                        timeout=60)
    assert r.returncode == 2 and "cannot listen" in r.stderr and "Traceback" not in r.stderr


def loopback_interface() -> str:
    import ifaddr

    return next(a.nice_name for a in ifaddr.get_adapters()
                if any(ip.ip == "127.0.0.1" for ip in a.ips))


@pytest.mark.parametrize("option", ["--address", "--interface"])
def test_node_on_loopback_for_a_one_machine_cluster(tmp_path, option):
    """`--address 127.0.0.1` and `--interface lo` name what exists: a one-machine trial
    (docs/cluster.md) runs its nodes on them, and the node advertises that link."""
    lo = loopback_interface()
    secret = tmp_path / "secret"
    secret.write_text("s" * 64)
    secret.chmod(0o600)
    p, port, startup = start_node(tmp_path, secret, option,
                                  "127.0.0.1" if option == "--address" else lo)
    try:
        assert f"; {lo} 127.0.0.1/" in startup
        r = run_mlxdist("cluster", "--cluster", "c1", "--secret-file", str(secret), "--no-mdns",
                        "--node", f"127.0.0.1:{port}", "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        [n] = json.loads(r.stdout)["nodes"]
        assert n["health"] == "ok"
        assert [(link["interface"], link["addresses"][0].split("/")[0]) for link in n["links"]] \
            == [(lo, "127.0.0.1")]
    finally:
        stop(p)


@pytest.mark.parametrize("option,value", [("--address", "192.0.2.1"),
                                          ("--interface", "nosuchif0")])
def test_node_refuses_what_this_machine_lacks(tmp_path, option, value):
    secret = tmp_path / "s"
    secret.write_text("s" * 64)
    secret.chmod(0o600)
    r = run_mlxdist("node", "--no-mdns", "--bind", "127.0.0.1", "--port", "0", option, value,
                    "--secret-file", str(secret), "--data-dir", str(tmp_path / "d"), timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "mlxdist: error: none of the given --interface/--address exist on this machine"]
