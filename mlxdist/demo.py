"""CLI for `mlxdist demo` (stub: replaced by the issue that builds it)."""

import click

from mlxdist.errors import UserError


@click.command("demo", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def demo_command(args: tuple[str, ...]) -> None:
    """Not built yet."""
    raise UserError("`mlxdist demo` is not built yet")
