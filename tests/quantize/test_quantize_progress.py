"""The progress display: a redrawn bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import io

from quantize.progress import Progress
from quantize_helpers import llama_ckpt  # noqa: F401 (fixture)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_bar_redraws_one_line():
    out = FakeTTY()
    bar = Progress(4, 4_000_000, stream=out)
    bar.skip(1, 1_000_000)  # done by an earlier run
    for _ in range(3):
        bar.last = 0  # draw every step
        bar.advance(1, 1_000_000)
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    last = text.split("\r")[-1]
    assert "[########################] 100%" in last and "4/4 tensors" in last
    assert "4.0 MB/4.0 MB" in last and "B/s" in last and "ETA 0:00" in last


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    bar = Progress(10, 1000, stream=out, interval=3600)
    for _ in range(10):
        bar.advance(1, 100)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 2  # the first step, then the last (interval not reached between)
    assert lines[-1].startswith("quantize: 100% 10/10 tensors")


def test_quiet():
    out = FakeTTY()
    bar = Progress(1, 1, enabled=False, stream=out)
    bar.advance(1, 1)
    bar.close()
    assert out.getvalue() == ""


def test_cli_draws_a_bar_on_a_terminal(llama_ckpt, tmp_path):
    import os
    import sys

    import pexpect
    from quantize_helpers import ROOT

    child = pexpect.spawn(sys.executable, ["-m", "mlxdist", "quantize", str(llama_ckpt), str(tmp_path / "out")],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    child.expect(r"\r\[[#-]{24}\] +\d+% \d+/\d+ tensors")
    child.expect("quantize: done")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
