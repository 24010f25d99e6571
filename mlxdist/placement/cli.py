"""CLI for `mlxdist plan` (stub: replaced by the issue that builds it)."""

import click

from mlxdist.errors import UserError


@click.command("plan", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def plan_command(args: tuple[str, ...]) -> None:
    """Not built yet."""
    raise UserError("`mlxdist plan` is not built yet")
