from tests.conftest import run_mlxdist


def test_help_lists_every_subcommand() -> None:
    out = run_mlxdist("--help", timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("quantize", "run", "plan", "node", "cluster", "serve", "chat"):
        assert name in out.stdout


def test_unknown_subcommand_is_one_line_error() -> None:
    out = run_mlxdist("frobnicate", timeout=60)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
