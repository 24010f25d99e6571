"""`mlxdist run MODEL --ranks N -p PROMPT`: N local ranks (ring backend over 127.0.0.1),
the answer streamed to stdout. `--plan plan.json` runs a plan's stages instead, one local
rank per node: pipeline, expert-parallel, or mixed (runtime/mixed.py)."""

from __future__ import annotations

import sys

import click

from mlxdist.errors import UserError, plural
from mlxdist.runtime.api import HANDOFF_HELP, HANDOFFS, check_handoff
from mlxdist.runtime.config import BACKENDS, EngineConfig


def _parse_split(split: str | None) -> list[int] | None:
    if not split:
        return None
    try:
        return [int(s) for s in split.split(",")]
    except ValueError:
        raise UserError(f"--split must be comma-separated layer counts, like 20,25,16 (got {split!r})")


def _from_plan(plan_file: str, ranks: int | None, split: list[int] | None,
               config: EngineConfig) -> tuple[int, list[int] | None, EngineConfig]:
    """Ranks, split and config for running a plan file's stages on local ranks."""
    from mlxdist.placement.plan import Plan
    from mlxdist.runtime.mixed import plan_run

    if split is not None or config.expert_parallel:
        raise UserError("--plan gives the stages: no --split or --expert-parallel with it")
    run = plan_run(Plan.load(plan_file), config)
    if ranks is not None and ranks != run.ranks:
        raise UserError(f"--ranks {ranks}, but the plan runs on {plural(run.ranks, 'node')} (one rank each)")
    return run.ranks, list(run.split) if run.split else None, run.config


@click.command("run")
@click.argument("model", type=click.Path())
@click.option("--ranks", "-n", type=int, default=None, help="local ranks (processes); default 1, or the plan's nodes")
@click.option("--split", default=None, help="layers per rank, e.g. 20,25,16 (default: even)")
@click.option("--prompt", "-p", required=True, help="the prompt (sent through the chat template)")
@click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=128, show_default=True,
              help="most tokens to generate")
@click.option("--temp", type=float, default=0.0, show_default=True, help="0 = greedy")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--raw", is_flag=True, help="send the prompt as is, without the chat template")
@click.option("--backend", default="ring", show_default=True, type=click.Choice(BACKENDS))
@click.option("--stats", is_flag=True, help="print timing to stderr at the end")
@click.option("--expert-parallel", is_flag=True,
              help="MoE models: every rank runs all layers with 1/N of the routed experts")
@click.option("--plan", "plan_file", default=None, type=click.Path(dir_okay=False),
              help="a plan from `mlxdist plan --json`: its stages on local ranks, one per node (pipeline, "
                   "expert-parallel, or mixed: pipeline stages and one expert-parallel stage over some ranks)")
@click.option("--handoff", default="messages", show_default=True, type=click.Choice(HANDOFFS), help=HANDOFF_HELP)
def run_command(model: str, ranks: int | None, split: str | None, prompt: str, max_tokens: int, temp: float,
                top_p: float, top_k: int, min_p: float, repetition_penalty: float, seed: int | None,
                raw: bool, backend: str, stats: bool, expert_parallel: bool, plan_file: str | None,
                handoff: str) -> None:
    """Generate an answer to PROMPT with MODEL spread over local ranks."""
    import time

    from mlxdist.runtime.api import GenerationRequest, SamplingParams
    from mlxdist.runtime.engine import open_engine
    from mlxdist.runtime.group import WorkerFailure
    from mlxdist.runtime.stage import note_if_upcast

    check_handoff(handoff, expert_parallel=expert_parallel)
    note_if_upcast(model)  # float16 -> float32 on the CPU backend, said here: workers log elsewhere
    cut = _parse_split(split)
    try:
        config = EngineConfig(backend=backend, expert_parallel=expert_parallel, handoff=handoff)
        if plan_file:
            ranks, cut, config = _from_plan(plan_file, ranks, cut, config)
        ranks = 1 if ranks is None else ranks
        engine = open_engine(model, config, ranks=ranks, split=cut)
    except WorkerFailure as e:
        raise UserError(str(e))
    try:
        tokens = list(engine.tokenizer.encode(prompt)) if raw else engine.encode_chat(
            [{"role": "user", "content": prompt}])
        req = GenerationRequest(tuple(tokens), max_tokens,
                                SamplingParams(temp, top_p, top_k, min_p, repetition_penalty, seed=seed))
        t0, n = time.monotonic(), 0
        for ev in engine.submit(req):
            if ev.error:
                raise UserError(ev.error)
            n += ev.token is not None
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if stats:
            dt = time.monotonic() - t0
            click.echo(f"[{plural(n, 'token')} in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s, "
                       f"{plural(ranks, 'rank')}]", err=True)
    except KeyboardInterrupt:
        raise
    finally:
        engine.close()
