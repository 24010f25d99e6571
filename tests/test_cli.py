import pytest

from mlxdist.cli import SUBCOMMANDS
from mlxdist.errors import plural
from tests.conftest import run_mlxdist


def test_help_lists_every_subcommand() -> None:
    out = run_mlxdist("--help", timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("quantize", "run", "plan", "node", "cluster", "serve", "chat"):
        assert name in out.stdout


def test_unknown_subcommand_is_one_line_error() -> None:
    out = run_mlxdist("frobnicate", timeout=60)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "mlxdist: error: no such command 'frobnicate' (usage: mlxdist [OPTIONS] COMMAND [ARGS]...; "
        "see 'mlxdist --help')"]


USAGE_ERRORS = [
    ("--bogus",),
    *[(name, "--no-such-option") for name in sorted(SUBCOMMANDS)],
    ("run",),  # missing argument
    ("run", "m"),  # missing required option
    ("run", "m", "-p", "hi", "-m", "abc"),  # not an integer
    ("run", "m", "-p", "hi", "-m", "0"),  # out of range: at least one token
    ("run", "m", "-p", "hi", "extra"),  # extra argument
    ("quantize",),
    ("quantize", "src", "out", "--stages", "0"),
    ("quantize", "src", "out", "--recipe", "nope"),
    ("plan",),
    ("plan", "m", "--strategy", "nope"),
    ("serve",),
    ("chat", "--max-tokens", "x"),
    ("chat", "--max-tokens", "0"),
    ("demo", "--max-tokens", "0"),
    ("demo", "--ranks", "x"),
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=" ".join)
def test_usage_errors_print_in_our_style(args) -> None:
    """Every subcommand's usage errors: one line `mlxdist: error: ...` with the usage and
    where to read more, exit code 2, none of click's own "Error:"/"Usage:" block."""
    r = run_mlxdist(*args, timeout=60)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("mlxdist: error: "), r.stderr
    command = "mlxdist" if args[0].startswith("-") else f"mlxdist {args[0]}"
    assert f"(usage: {command} " in lines[0] and lines[0].endswith(f"; see '{command} --help')"), lines[0]
    assert "Error:" not in r.stderr and "Usage:" not in r.stderr and "Traceback" not in r.stderr


def test_range_errors_name_the_option() -> None:
    r = run_mlxdist("run", "m", "-p", "hi", "-m", "0", timeout=60)
    assert r.stderr.startswith("mlxdist: error: invalid value for '--max-tokens' / '-m': 0 is not in the range x>=1 ")
    r = run_mlxdist("quantize", "src", "out", "--stages", "0", timeout=60)
    assert r.stderr.startswith("mlxdist: error: invalid value for '--stages': 0 is not in the range x>=1 ")


def test_plural() -> None:
    assert [plural(n, "rank") for n in (0, 1, 2)] == ["0 ranks", "1 rank", "2 ranks"]
    assert plural(1, "entry", "entries") == "1 entry" and plural(3, "entry", "entries") == "3 entries"
