"""CLI for `mlxdist quantize` (stub: replaced by the issue that builds it)."""

import click

from mlxdist.errors import UserError


@click.command("quantize", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def quantize_command(args: tuple[str, ...]) -> None:
    """Not built yet."""
    raise UserError("`mlxdist quantize` is not built yet")
