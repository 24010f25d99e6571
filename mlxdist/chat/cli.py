"""CLI for `mlxdist chat` (stub: replaced by the issue that builds it)."""

import click

from mlxdist.errors import UserError


@click.command("chat", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def chat_command(args: tuple[str, ...]) -> None:
    """Not built yet."""
    raise UserError("`mlxdist chat` is not built yet")
