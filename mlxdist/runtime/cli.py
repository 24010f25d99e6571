"""CLI for `mlxdist run` (stub: replaced by the issue that builds it)."""

import click

from mlxdist.errors import UserError


@click.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_command(args: tuple[str, ...]) -> None:
    """Not built yet."""
    raise UserError("`mlxdist run` is not built yet")
