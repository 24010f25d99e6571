"""CLI for `mlxdist serve`: load a model (one process, N local ranks, or a cluster) and
serve it over the OpenAI API."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import click

from mlxdist.errors import UserError
from mlxdist.runtime.api import HANDOFF_HELP, HANDOFFS, check_handoff
from mlxdist.runtime.config import EngineConfig

DEFAULT_PROMPT_CACHE = 4  # retained requests; each holds its KV caches until evicted


def _plan_concurrency(plan_file: str) -> int:
    """The concurrency a plan (`mlxdist plan --json`) was made for: its KV caches are the
    ones the planner counted."""
    import json

    try:
        value = json.loads(Path(plan_file).read_text()).get("concurrency", EngineConfig.max_concurrent)
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{plan_file}: not a plan from `mlxdist plan --json` ({e})")
    if not isinstance(value, int) or value < 1:
        raise UserError(f"{plan_file}: its concurrency is not a positive whole number")
    return value


def local_plan(plan_file: str, local: int | None, config: EngineConfig):
    """How a plan file's stages run on local ranks, one per node of the plan (pipeline: its
    split; expert-parallel; mixed: `mixed.plan_run`); `--local`, if given, must be the
    plan's node count. One-line UserError for a mismatch."""
    from mlxdist.errors import plural
    from mlxdist.placement.plan import Plan
    from mlxdist.runtime.mixed import plan_run

    run = plan_run(Plan.load(plan_file), config)
    if local is not None and local != run.ranks:
        raise UserError(f"--local {local}, but --plan {plan_file} runs on {plural(run.ranks, 'node')} "
                        f"(one local rank each): give --local {run.ranks} or leave it out")
    return run


def open_engine_for(model: str, local: int | None, nodes: str | None, config: EngineConfig,
                    progress=print, plan: str | None = None):
    """The engine for MODEL: `demo` is the built-in demo model; `--nodes` asks the
    cluster package (with `plan`, its nodes in its order); otherwise one process (or
    `--local N` ranks, or with `plan` its stages on one local rank per node) on this
    machine."""
    if local is not None and local < 1:
        raise UserError("--local must be at least 1")
    if model == "demo":
        from mlxdist.demo_model import DEMO_NAME, prepare_demo_model

        path = prepare_demo_model(stages=local or 1, progress=progress)
        config = replace(config, model_name=config.model_name or DEMO_NAME)
    else:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise UserError(f"{model}: no such model directory (convert one with `mlxdist quantize`, "
                            "or give an mlx-lm model directory, or `demo`)")
    if nodes:
        try:
            # the cluster package's hook: discover/place/deliver/launch, return an Engine
            from mlxdist.cluster.coordinator import open_cluster_engine  # type: ignore[attr-defined]
        except ImportError:
            raise UserError("--nodes needs mlxdist.cluster.coordinator.open_cluster_engine, which this build "
                            "does not have yet; use --local N to run ranks on this machine")
        return start_engine(open_cluster_engine, path, nodes=nodes, progress=progress, plan=plan,
                            config=config)
    try:
        from mlxdist.runtime.engine import open_engine  # type: ignore[import-not-found]
    except ImportError:
        raise UserError("this build has no runtime engine (mlxdist.runtime.engine)")
    from mlxdist.runtime.stage import note_if_upcast

    if plan is not None:
        run = local_plan(plan, local, config)
        progress(f"loading {path} on {run.ranks} rank{'s' if run.ranks > 1 else ''} as {plan} places it ...")
        note_if_upcast(path)
        return start_engine(open_engine, str(path), run.config, ranks=run.ranks,
                            split=list(run.split) if run.split else None)
    ranks = local or 1
    progress(f"loading {path} on {ranks} rank{'s' if ranks > 1 else ''} ...")
    note_if_upcast(path)  # the ranks' own stderr goes to their logs
    return start_engine(open_engine, str(path), config, ranks=ranks)


def parse_efforts(text: str | None) -> dict[str, int]:
    """`--reasoning-budgets low=1024,high=16384`: reasoning_effort levels -> thinking tokens,
    over the defaults."""
    from mlxdist.server.protocol import EFFORT_BUDGETS

    out = dict(EFFORT_BUDGETS)
    for part in filter(None, (text or "").split(",")):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in out or not value.strip().isdigit():
            raise UserError(f"--reasoning-budgets: '{part}' is not LEVEL=TOKENS with LEVEL one of {', '.join(out)}")
        out[name] = int(value)
    return out


def same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the same orderly stop as Ctrl-C


def start_engine(opener: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """A model that fails to start (a rank dies, a shard is refused) is reported in one
    line; MLXDIST_DEBUG=1 keeps the traceback."""
    try:
        return opener(*args, **kw)
    except UserError:
        raise
    except Exception as e:
        if os.environ.get("MLXDIST_DEBUG"):
            raise
        raise UserError(f"the model did not start: {type(e).__name__}: {e}") from e


@click.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--local", type=int, default=None, help="Run N ranks on this machine.")
@click.option("--nodes", default=None, help="'auto' (discover with mDNS) or a comma-separated list of nodes.")
@click.option("--plan", "plan", default=None, type=click.Path(dir_okay=False),
              help="A plan from `mlxdist plan --json` (the one the model was converted with): with "
                   "--nodes, its nodes run the stages, in its order; else its stages run on local ranks, "
                   "one per node of the plan (pipeline, expert-parallel or mixed; --local must match).")
@click.option("--api-key", default=None, envvar="MLXDIST_API_KEY", help="Require this bearer key.")
@click.option("--concurrency", default=None, type=click.IntRange(1, 1024),
              help="Requests decoded together, one batched forward per step (the batch width); more wait "
                   "in the queue. Default: the plan's --concurrency with --plan (its KV caches are what the "
                   "planner counted), else 8.")
@click.option("--max-queue", default=64, show_default=True, type=int,
              help="Requests that may wait for a slot; more get 429.")
@click.option("--max-connections", default=4096, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Open connections the server keeps; one more is answered 503 and closed.")
@click.option("--quiet", is_flag=True, help="Do not log each request.")
@click.option("--expert-parallel", is_flag=True,
              help="With --local N (an MoE model): every rank all layers, 1/N of the routed experts.")
@click.option("--handoff", default="messages", show_default=True, type=click.Choice(HANDOFFS),
              help=HANDOFF_HELP)
@click.option("--verifier", default=None, metavar="VMODEL",
              help="A second model that scores answers for search requests (best-of-N, beam search, "
                   "DVTS; docs/test-time-compute.md), run the same way as MODEL (--local N or --nodes). "
                   "The same directory as MODEL: the model judges its own answers, loaded once.")
@click.option("--reasoning-budgets", default=None, metavar="LEVEL=TOKENS,...",
              help="Thinking tokens for each reasoning_effort level (none, minimal, low, medium, high); "
                   "default none=0,minimal=256,low=1024,medium=4096,high=16384.")
@click.option("--prompt-cache", default=DEFAULT_PROMPT_CACHE, show_default=True, type=click.IntRange(0, 1024),
              help="Finished requests whose KV caches stay (on every rank) for a prompt that starts "
                   "the same way, e.g. a chat's next turn; 0 turns prefix caching off.")
def serve_command(model: str, host: str, port: int, local: int | None, nodes: str | None,
                  plan: str | None, api_key: str | None, max_queue: int, quiet: bool, max_connections: int = 4096,
                  expert_parallel: bool = False, handoff: str = "messages",
                  prompt_cache: int = DEFAULT_PROMPT_CACHE, concurrency: int | None = None,
                  verifier: str | None = None, reasoning_budgets: str | None = None) -> None:
    """Serve MODEL (a converted model directory, an mlx-lm directory, or `demo`) over an
    OpenAI-compatible HTTP API."""
    from mlxdist.server.app import ApiServer, HttpLimits, bind, fd_limit_only_raised

    if local is not None and nodes:
        raise UserError("give --local or --nodes, not both")
    if plan and expert_parallel:
        raise UserError("--plan gives the stages: no --expert-parallel with it")
    if expert_parallel and nodes:
        raise UserError("--expert-parallel runs with --local N; the cluster launches pipeline stages only")
    check_handoff(handoff, nodes=bool(nodes), expert_parallel=expert_parallel)
    efforts = parse_efforts(reasoning_budgets)
    progress = lambda msg: click.echo(msg, err=True)  # noqa: E731
    concurrency = concurrency or (_plan_concurrency(plan) if plan else EngineConfig.max_concurrent)
    config = EngineConfig(max_concurrent=concurrency, prompt_cache=prompt_cache,
                          expert_parallel=expert_parallel, handoff=handoff)
    try:  # before the model loads: a port in use is found at once
        sock = bind(host, port)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}")
    try:
        with fd_limit_only_raised():  # mlx-lm's import would cap the sockets at 4096 for good
            import mlx_lm.utils  # noqa: F401
        engine = open_engine_for(model, local, nodes, config, progress=progress, plan=plan)
    except BaseException:
        sock.close()
        raise
    judge = None
    try:
        if verifier and not same_model(verifier, model):
            progress(f"verifier: {verifier}")
            judge = open_engine_for(verifier, local, nodes, config, progress=progress)
        server = ApiServer(engine, host, port, api_key=api_key, max_queue=max_queue, quiet=quiet,
                           limits=HttpLimits(max_connections=max_connections), sock=sock,
                           verifier=judge, efforts=efforts)
        if server.limits.max_connections < max_connections:
            progress(f"note: at most {server.limits.max_connections} connections (this process may open no more "
                     "files; raise `ulimit -n`)")
        if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
            progress(f"warning: listening on {host} without --api-key: anyone who can reach it can use it")
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        server.start()
        progress(f"serving {engine.model_name} at {server.url}/v1 (context {engine.context_length} tokens, "
                 f"{engine.max_concurrent} at once){' with an API key' if api_key else ''}; Ctrl-C stops")
        try:
            while not server.wait(0.5):
                pass
        except KeyboardInterrupt:
            progress("stopping")
        finally:
            server.shutdown()
    finally:
        if judge is not None:
            judge.close()
        engine.close()
