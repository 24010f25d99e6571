"""The `mlxdist` command. Each subcommand lives beside the code it drives and is imported
only when used, so `mlxdist plan` does not pay for importing the HTTP server."""

from __future__ import annotations

import importlib
import sys

import click

from mlxdist import __version__
from mlxdist.errors import UserError

# name -> "module:attribute" of a click.Command
SUBCOMMANDS: dict[str, str] = {
    "quantize": "quantize.cli:quantize_command",
    "run": "mlxdist.runtime.cli:run_command",
    "plan": "mlxdist.cluster.plan_cli:plan_command",
    "node": "mlxdist.cluster.cli:node_command",
    "cluster": "mlxdist.cluster.cli:cluster_command",
    "serve": "mlxdist.server.cli:serve_command",
    "chat": "mlxdist.chat.cli:chat_command",
    "demo": "mlxdist.demo:demo_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="mlxdist")
def cli() -> None:
    """Run large language models across several Macs with MLX."""


# click >= 8.2 raises this (a UsageError) for a bare `mlxdist`; older clicks print the help
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def usage_error_line(e: click.UsageError) -> str:
    """click's usage errors (missing option, bad value, unknown command...) in our style:
    one line, `mlxdist: error: ...` and the usage, as UserError prints its message."""
    msg = " ".join(line.strip() for line in e.format_message().splitlines() if line.strip()).rstrip(".")
    if msg[:1].isupper() and msg[1:2].islower():  # "Missing option" -> "missing option"
        msg = msg[0].lower() + msg[1:]
    ctx = e.ctx
    if ctx is None:
        return f"mlxdist: error: {msg} (see 'mlxdist --help')"
    usage = ctx.get_usage().strip()
    usage = " ".join(usage.split()[1:]) if usage.lower().startswith("usage:") else usage
    return f"mlxdist: error: {msg} (usage: {usage}; see '{ctx.command_path} --help')"


def main(argv: list[str] | None = None) -> None:
    """Every error the user can cause ends here in one style: one line on stderr,
    `mlxdist: error: ...`, exit code 2 (UserError and click's usage errors alike)."""
    try:
        cli.main(args=argv, prog_name="mlxdist", standalone_mode=False)
    except UserError as e:
        click.echo(f"mlxdist: error: {e}", err=True)
        sys.exit(e.exit_code)
    except NO_ARGS_IS_HELP as e:  # bare `mlxdist`: the help, as before
        e.show()
        sys.exit(e.exit_code)
    except click.UsageError as e:
        click.echo(usage_error_line(e), err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"mlxdist: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
