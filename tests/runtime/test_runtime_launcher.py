"""LocalLauncher's temporary directory: removed by terminate() (the group calls it on
failure, on close and before a restart), with each rank's log tail kept for the failure
message; a caller's log_dir is never removed."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.launcher import LocalLauncher, WorkerSpec

FAKE_WORKER = """
import sys
from mlxdist.runtime.launcher import WorkerSpec
assert sys.argv[1:] == ["-m", "mlxdist.runtime.worker"], sys.argv  # nothing else on the command line
spec = WorkerSpec.from_msgpack(sys.stdin.buffer.read())
for i in range(1, 8):
    print(f"line {i}", flush=True)
print(f"boom: rank {spec.rank} of {spec.ranks}", file=sys.stderr, flush=True)
sys.exit(3)
"""


def fake_python(tmp_path: Path) -> str:
    """Stands in for the worker's interpreter: reads its spec from stdin as the worker
    does, says something per rank and exits 3."""
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\n{FAKE_WORKER}")
    script.chmod(0o755)
    return str(script)


def specs(launcher: LocalLauncher, n: int) -> list[WorkerSpec]:
    return [WorkerSpec(rank=r, ranks=n, hostfile=launcher.hostfile_path(), model_dir="m", start=r, end=r + 1,
                       num_layers=n, control="127.0.0.1:1", session="s", config=EngineConfig())
            for r in range(n)]


def run_to_exit(launcher: LocalLauncher, n: int) -> None:
    launcher.launch(specs(launcher, n), [["127.0.0.1:1"]] * n)
    deadline = time.monotonic() + 30
    while any(code is None for code in launcher.poll().values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert launcher.poll() == {r: 3 for r in range(n)}


def test_terminate_removes_its_directory_and_keeps_the_tails(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    launcher = LocalLauncher(python=fake_python(tmp_path))
    assert launcher.dir.parent == tmp_path / "tmp" and launcher.dir.name.startswith("mlxdist-run-")
    run_to_exit(launcher, 2)
    before = [launcher.log_tail(r) for r in range(2)]
    assert before[1].splitlines() == ["line 4", "line 5", "line 6", "line 7", "boom: rank 1 of 2"]
    launcher.terminate()
    assert not launcher.dir.exists() and not list((tmp_path / "tmp").iterdir())
    assert [launcher.log_tail(r) for r in range(2)] == before  # what group.py's failure message reads
    assert launcher.log_tail(0, lines=1) == "boom: rank 0 of 2"
    launcher.terminate()  # again (on failure, then on close): harmless
    run_to_exit(launcher, 2)  # launched again after terminate(): the directory comes back
    assert launcher.dir.exists()
    launcher.cleanup()
    assert not launcher.dir.exists() and launcher.log_tail(1, lines=1) == "boom: rank 1 of 2"


def test_a_callers_log_dir_is_kept(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    launcher = LocalLauncher(python=fake_python(tmp_path), log_dir=str(logs))
    run_to_exit(launcher, 1)
    launcher.terminate()
    assert sorted(os.listdir(logs)) == ["hostfile.json", "rank0.log"]
    assert launcher.log_tail(0, lines=1) == "boom: rank 0 of 1"


def test_a_launcher_never_terminated_leaves_nothing(tmp_path):
    launcher = LocalLauncher(python=fake_python(tmp_path))
    d = launcher.dir
    assert d.exists()
    del launcher  # e.g. the group's constructor failed before launch
    import gc

    gc.collect()
    assert not d.exists()
