"""What the web console costs: page weight, first paint on loopback, and the server's CPU
while the cluster view is open (its live stream) against the same time with no page open.
Prints JSON.

    python tools/bench_console.py [--model demo|tiny|MODEL_DIR] [--local 2] [--seconds 30] [--loads 5]

CPU is the user+system time of the serve process and its ranks (from /proc), as a
percentage of one core over the window. Needs Debian's `chromium` and `chromium-driver`
and the `test` extra (selenium); `bash tools/test.sh` installs them as root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "server"))

from browser import browser_missing, http_get, make_tiny, new_driver, quit_driver, serve, wait_browser  # noqa: E402


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def group_pids(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid:
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def cpu_percent(pgid: int, seconds: float) -> float:
    pids = group_pids(pgid)
    c0, t0 = cpu_seconds(pids), time.monotonic()
    time.sleep(seconds)
    return round(100 * (cpu_seconds(pids) - c0) / (time.monotonic() - t0), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--local", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--loads", type=int, default=5)
    a = ap.parse_args()
    if (why := browser_missing()):
        raise SystemExit(why)
    model = a.model
    if model == "tiny":
        model = str(make_tiny(Path(tempfile.mkdtemp(prefix="mlxdist-console-")) / "tiny"))
    out: dict = {"model": a.model, "local": a.local, "seconds": a.seconds}
    with serve(model, local=a.local, timeout=600) as s:
        weights = {p: len(http_get(s.url + p)[1]) for p in ("/", "/console/console.css", "/console/console.js")}
        out["page_bytes"] = {**weights, "total": sum(weights.values())}
        driver = new_driver()
        try:
            paints, loads = [], []
            for _ in range(a.loads):
                driver.get("about:blank")
                driver.get(s.url + "/")
                wait_browser(driver, lambda d: d.execute_script(
                    "return performance.getEntriesByName('first-contentful-paint').length"), 30, "first paint")
                paint = driver.execute_script("return performance.getEntriesByName('first-contentful-paint')[0].startTime")
                load = driver.execute_script("return performance.getEntriesByType('navigation')[0].loadEventEnd")
                paints.append(paint / 1000)
                loads.append(load / 1000)
            out["first_contentful_paint_s"] = {"median": round(statistics.median(paints), 4), "max": round(max(paints), 4)}
            out["load_event_s"] = {"median": round(statistics.median(loads), 4), "max": round(max(loads), 4)}
            driver.get("about:blank")
            out["server_cpu_percent_no_page"] = cpu_percent(s.proc.pid, a.seconds)
            driver.get(s.url + "/#cluster")
            wait_browser(driver, lambda d: d.execute_script(
                "return document.querySelectorAll('#plan .stage').length"), 30, "cluster view")
            time.sleep(2)  # the live stream is open
            out["server_cpu_percent_cluster_view_open"] = cpu_percent(s.proc.pid, a.seconds)
            out["live_view_cost_percent_of_a_core"] = round(out["server_cpu_percent_cluster_view_open"]
                                                           - out["server_cpu_percent_no_page"], 3)
        finally:
            quit_driver(driver)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
