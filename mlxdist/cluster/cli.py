"""CLI for `mlxdist node` (stub: replaced by the issue that builds it)."""

import click

from mlxdist.errors import UserError


@click.command("node", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def node_command(args: tuple[str, ...]) -> None:
    """Not built yet."""
    raise UserError("`mlxdist node` is not built yet")


@click.command("cluster", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def cluster_command(args: tuple[str, ...]) -> None:
    """Not built yet."""
    raise UserError("`mlxdist cluster` is not built yet")
