"""CLI for `mlxdist serve` (stub: replaced by the issue that builds it)."""

import click

from mlxdist.errors import UserError


@click.command("serve", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve_command(args: tuple[str, ...]) -> None:
    """Not built yet."""
    raise UserError("`mlxdist serve` is not built yet")
