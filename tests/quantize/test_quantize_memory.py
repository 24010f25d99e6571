"""Peak memory does not grow with the model: two checkpoints, one 4x the other (same
largest tensor), converted in fresh processes, peak RSS compared."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from quantize_helpers import ROOT, make_checkpoint

# The converter's own peak: VmHWM, its address space's high-water mark. (Linux's ru_maxrss
# would also count the parent's, which a child inherits across fork and exec: a test
# session's pytest past 1.5 GB made a 90 MB conversion read 1.5 GB.)
MEASURE = """
import resource, sys
from quantize.convert import convert
convert(sys.argv[1], sys.argv[2], stages=2, progress=False)
try:
    print(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024)
except OSError:  # no /proc (macOS): ru_maxrss, in bytes there
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss(src, out) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(out)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1])


def _size(path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def test_peak_rss_does_not_grow_with_model_size(tmp_path):
    small = make_checkpoint.llama(tmp_path / "small", layers=4, hidden=512, intermediate=1536, files=1)
    big = make_checkpoint.llama(tmp_path / "big", layers=16, hidden=512, intermediate=1536, files=4)
    assert _size(big) >= 3.5 * _size(small)
    rss_small = _peak_rss(small, tmp_path / "small-out")
    rss_big = _peak_rss(big, tmp_path / "big-out")
    growth = rss_big - rss_small
    # holding the model would add at least its size; streaming adds (nearly) nothing
    assert growth < 0.25 * (_size(big) - _size(small)), (rss_small, rss_big, _size(small), _size(big))
    largest = max(t["bytes"] for t in json.loads((tmp_path / "big-out" / "manifest.json").read_text())["tensors"].values())
    assert rss_big < 1.5e9 + 3 * largest
