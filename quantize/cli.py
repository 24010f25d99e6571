"""`mlxdist quantize SRC OUT`: the command line over `quantize.convert.convert`."""

from __future__ import annotations

import click


@click.command("quantize")
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False, path_type=str))
@click.option("--bits", type=int, default=None, help="Bits per weight [default: 4, a GGUF's own]")
@click.option("--group-size", type=int, default=None, help="Weights per scale [default: 64, a GGUF's own]")
@click.option("--recipe", type=click.Choice(["uniform", "mixed"]), default="uniform", show_default=True,
              help="mixed: routed experts at --bits, attention/shared/dense at 6-8 bits")
@click.option("--stages", type=click.IntRange(min=1), default=None,
              help="Cut the layers into N stages of even size")
@click.option("--plan", "plan", type=click.Path(dir_okay=False), default=None,
              help="Cut as a placement plan says (JSON with stages[].layers)")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="dtype of unquantized parameters and scales [default: config.json's torch_dtype]")
@click.option("--keep-mtp", is_flag=True, help="Keep DeepSeek's multi-token-prediction layer")
@click.option("--quiet", is_flag=True, help="No progress output")
def quantize_command(src: str, out: str, bits: int | None, group_size: int | None, recipe: str,
                     stages: int | None, plan: str | None, dtype: str | None, keep_mtp: bool, quiet: bool) -> None:
    """Convert SRC (a Hugging Face directory, a .gguf file or a hub repo id) into
    quantized MLX weights in OUT, one directory per pipeline stage. Rerun the same
    command after an interruption to resume."""
    from quantize.convert import convert

    path = convert(src, out, bits=bits, group_size=group_size, recipe=recipe, stages=stages,
                   plan=plan, keep_mtp=keep_mtp, progress=not quiet, dtype=dtype)
    if not quiet:
        click.echo(f"quantize: done: {path}", err=True)
