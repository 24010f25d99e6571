"""tools/venv.sh (sourced by tools/test.sh and tools/demo.sh): pip runs only when nothing
is installed yet or pyproject.toml changed, its real errors are shown, and setuptools'
editable-install notice is not. Over a stand-in venv whose python logs pip's calls."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# what pip -q printed on every run (setuptools 80+ through pip 25/26), then one real line
NOTICE = """\
  /tmp/pip-build-env-x/overlay/lib/python3.11/site-packages/setuptools/command/editable_wheel.py:354: \
BuildBackendWarning: Editable installation.
  !!
  
          ********************************************************************************
          Please be careful with folders in your working directory with the same
          name as your package as they may take precedence during imports.
          ********************************************************************************
  
  !!
    with strategy, WheelFile(wheel_path, "w") as wheel_obj:
"""


def fake_venv(tmp_path: Path, pip_says: str, pip_rc: int = 0) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (tmp_path / "pip-says.txt").write_text(pip_says)
    python = venv / "bin" / "python"
    python.write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "$*" >> "{tmp_path}/pip-calls.txt"
  cat "{tmp_path}/pip-says.txt" >&2
  [ {pip_rc} = 0 ] && touch "{venv}/bin/mlxdist" && chmod +x "{venv}/bin/mlxdist"
  exit {pip_rc}
fi
exec "{sys.executable}" "$@"
""")
    python.chmod(0o755)
    return venv


def source_venv_sh(venv: Path, what: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", 'set -euo pipefail; source tools/venv.sh "$0"; echo "VENV=$VENV"', what],
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", "MLXDIST_VENV": str(venv)},
                          capture_output=True, text=True, timeout=60)


def pip_calls(tmp_path: Path) -> list[str]:
    f = tmp_path / "pip-calls.txt"
    calls = f.read_text().splitlines() if f.exists() else []
    f.unlink(missing_ok=True)
    return calls


def test_installs_once_and_quietly(tmp_path) -> None:
    venv = fake_venv(tmp_path, NOTICE + "ERROR: something pip really means\n")
    r = source_venv_sh(venv, ".[test]")
    assert r.returncode == 0 and r.stdout == f"VENV={venv}\n", r.stderr
    assert pip_calls(tmp_path) == ["-m pip install -q --upgrade pip", "-m pip install -q -e .[test]"]
    assert "careful" not in r.stderr and "!!" not in r.stderr and "Editable installation" not in r.stderr
    assert r.stderr.count("ERROR: something pip really means") == 2, r.stderr  # real output is kept
    for what in (".[test]", "."):  # nothing changed: no pip at all (".[test]" covers ".")
        r = source_venv_sh(venv, what)
        assert r.returncode == 0 and r.stderr == "" and pip_calls(tmp_path) == [], r.stderr
    stamp = venv / ".mlxdist-installed"
    line = stamp.read_text()
    assert line.endswith(f" {ROOT} .[test]\n")
    stamp.write_text("0" * 64 + line[64:])  # as if pyproject.toml had changed since
    assert source_venv_sh(venv, ".").returncode == 0
    assert pip_calls(tmp_path) == ["-m pip install -q --upgrade pip", "-m pip install -q -e ."]
    assert stamp.read_text() == line[:64] + f" {ROOT} .\n"  # the stale line is gone
    assert source_venv_sh(venv, ".[test]").returncode == 0 and pip_calls(tmp_path)[-1] == "-m pip install -q -e .[test]"


def test_a_failed_install_says_why_and_is_not_stamped(tmp_path) -> None:
    venv = fake_venv(tmp_path, NOTICE + "ERROR: No matching distribution found for mlx>=0.32\n", pip_rc=1)
    r = source_venv_sh(venv, ".[test]")
    assert r.returncode == 1 and "VENV=" not in r.stdout
    assert "ERROR: No matching distribution found for mlx>=0.32" in r.stderr and "careful" not in r.stderr
    assert not (venv / ".mlxdist-installed").exists()
