"""Browser-test helpers for the web console (docs/console.md): a headless Chromium driven
by Selenium through Debian's own chromedriver, and `mlxdist serve` as a subprocess.

Selenium never downloads anything here: the driver's path is given to `Service`, so
Selenium Manager is not run, and `SE_AVOID_STATS` keeps it quiet if it ever were. As root,
`bash tools/test.sh` installs `chromium` and `chromium-driver` with apt-get; without them
the browser tests are skipped, with the reason in pytest's summary (`-ra`).

tools/screenshots.py uses these helpers too, outside pytest.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("SE_AVOID_STATS", "true")  # before Selenium is imported

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
WINDOW = (1280, 900)
CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={WINDOW[0]},{WINDOW[1]}", "--no-first-run", "--no-default-browser-check",
                 "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--metrics-recording-only", "--password-store=basic")


def chromium_binary() -> str | None:
    return next((p for p in CHROMIUM_CANDIDATES if os.access(p, os.X_OK)), None)


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    missing = []
    if chromium_binary() is None:
        missing.append(f"chromium ({' or '.join(CHROMIUM_CANDIDATES)})")
    if not os.access(CHROMEDRIVER, os.X_OK):
        missing.append(f"chromedriver ({CHROMEDRIVER})")
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package (pip install -e '.[test]')")
    if not missing:
        return None
    how = ("`bash tools/test.sh` installs them as root (apt-get install chromium chromium-driver)"
           if os.geteuid() != 0 else
           "run `bash tools/test.sh`, which installs them (apt-get install chromium chromium-driver)")
    return f"browser tests need {', '.join(missing)}: not installed; {how}"


def new_driver() -> Any:
    """A headless Chromium at a fixed window size, its console messages kept (all levels)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium_binary() or CHROMIUM_CANDIDATES[0]
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_window_size(*WINDOW)
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
    except BaseException:
        quit_driver(driver)
        raise
    return driver


def quit_driver(driver: Any) -> None:
    """Quit the browser; if WebDriver cannot, kill chromedriver (and so its Chromium)."""
    service = getattr(driver, "service", None)
    try:
        driver.quit()
    except Exception:
        proc = getattr(service, "process", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(name="browser")
def browser_fixture() -> Iterator[Any]:
    """A fresh headless Chromium per test (import `browser_fixture` to have `browser`)."""
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    driver = new_driver()
    try:
        yield driver
    finally:
        quit_driver(driver)


# ---- conditions ----------------------------------------------------------------------------

def wait_until(fn: Callable[[], Any], timeout: float, message: str, poll: float = 0.05) -> Any:
    """Poll `fn` until it returns something truthy (returned); AssertionError(message) at
    the deadline. Exceptions inside `fn` count as "not yet"; the last one is reported."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # not there yet
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (within {timeout:g} s)" + (f"; last error: {last!r}" if last else ""))
        time.sleep(poll)


def wait_browser(driver: Any, condition: Callable[[Any], Any], timeout: float, message: str,
                 seen: Callable[[Any], Any] | None = None) -> Any:
    """WebDriverWait; at the deadline an AssertionError that says what was waited for and,
    with `seen`, what the page showed instead."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except TimeoutException:
        pass
    shown = ""
    if seen is not None:
        try:
            shown = f"; the page shows {seen(driver)!r}"
        except Exception as e:
            shown = f"; (could not read the page: {e!r})"
    raise AssertionError(f"waited {timeout:g} s for {message}{shown}") from None


def severe_errors(driver: Any) -> list[dict]:
    """The SEVERE browser console entries since the last call (the log is drained)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def local_storage(driver: Any, key: str) -> Any:
    return driver.execute_script("return window.localStorage.getItem(arguments[0]);", key)


# ---- HTTP ----------------------------------------------------------------------------------

def http_get(url: str, key: str | None = None, timeout: float = 10) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def metrics_text(url: str, key: str | None = None) -> str:
    status, body, _ = http_get(url + "/metrics", key)
    assert status == 200, (status, body[:300])
    return body.decode()


def metric_value(url: str, line_prefix: str, key: str | None = None) -> float:
    """The value of the /metrics sample whose name and labels are `line_prefix` (0 if absent)."""
    for line in metrics_text(url, key).splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.split()[-1])
    return 0.0


# ---- `mlxdist serve` as a subprocess --------------------------------------------------------

class Served:
    """A running `mlxdist serve` process: its URL, model directory and log."""

    def __init__(self, proc: subprocess.Popen, model: Path) -> None:
        self.proc, self.model, self.url = proc, model, ""
        self.log: list[str] = []
        self._drainer = threading.Thread(target=self._drain, daemon=True)  # never blocks on its log
        self._drainer.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def log_tail(self, n: int = 40) -> str:
        return "".join(self.log[-n:])

    def announced_url(self) -> str:
        """The URL from its `serving NAME at URL/v1` line ("" before it)."""
        for line in list(self.log):
            m = SERVING.search(line)
            if m:
                return m.group(1)
        return ""

    def rank_pid(self, rank: int) -> int:
        from test_server_healing import rank_pid

        return rank_pid(self.proc, rank)


SERVING = re.compile(r"serving \S+ at (http://\S+?)/v1\b")


def make_tiny(path: Path, layers: int = 4, seed: int = 3) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    from tiny_models import make_tiny_model

    return make_tiny_model(path, arch="llama", layers=layers, seed=seed)


@contextlib.contextmanager
def serve(model: str | Path, local: int | None = None, api_key: str | None = None,
          extra: tuple[str, ...] = (), timeout: float = 180) -> Iterator[Served]:
    """`mlxdist serve MODEL --port 0 [--local N] [--api-key K] --quiet`, up (/health ok) on
    entry, stopped with all its ranks (its process group) on exit. Port 0: the server
    picks a free port and says it (`serving NAME at URL/v1`, printed even with --quiet), so
    no other server can be taken for this one."""
    cmd = [sys.executable, "-m", "mlxdist", "serve", str(model), "--port", "0", "--quiet", *extra]
    if local is not None:
        cmd += ["--local", str(local)]
    if api_key is not None:
        cmd += ["--api-key", api_key]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    served = Served(proc, Path(model))
    try:
        def up() -> bool:
            if proc.poll() is not None:
                served._drainer.join(5)  # the rest of its log
                raise AssertionError(f"`mlxdist serve` exited with {proc.returncode}:\n{served.log_tail()}")
            served.url = served.announced_url()
            if not served.url:
                return False
            try:
                status, body, _ = http_get(served.url + "/health", timeout=2)
                return status == 200 and json.loads(body).get("status") == "ok"
            except (OSError, ValueError):
                return False

        deadline = time.monotonic() + timeout
        while not up():
            if time.monotonic() > deadline:
                raise AssertionError(f"`mlxdist serve` was not up in {timeout:g} s:\n{served.log_tail()}")
            time.sleep(0.1)
        yield served
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # ranks left behind, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
