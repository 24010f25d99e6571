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
    "plan": "mlxdist.placement.cli:plan_command",
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


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="mlxdist", standalone_mode=False)
    except UserError as e:
        click.echo(f"mlxdist: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
