"""`mlxdist demo`: the README's main command. Fetches SmolLM2-135M-Instruct, converts it to
4-bit MLX shards, serves it on a 2-rank local cluster behind the OpenAI API, asks it one
question through that API, prints the answer as it streams, and shuts everything down."""

from __future__ import annotations

import time

import click

from mlxdist.errors import UserError, plural

DEFAULT_QUESTION = "What is the capital of France? Answer in one sentence."


@click.command("demo")
@click.argument("question", required=False, default=DEFAULT_QUESTION)
@click.option("--ranks", default=2, show_default=True, type=int, help="Local ranks (pipeline stages).")
@click.option("--max-tokens", default=96, show_default=True, type=click.IntRange(min=1))
def demo_command(question: str, ranks: int, max_tokens: int) -> None:
    """Convert the demo model, serve it on a local cluster, and print one chat answer."""
    from mlxdist.chat.client import Answer, ChatClient, ChatError, note
    from mlxdist.demo_model import DEMO_NAME, prepare_demo_model
    from mlxdist.server.app import ApiServer

    if ranks < 1:
        raise UserError("--ranks must be at least 1")
    step = iter(range(1, 5))
    progress = lambda msg: click.echo(f"[{next(step)}/4] {msg}", err=True)  # noqa: E731
    model = prepare_demo_model(stages=ranks, progress=progress)
    try:
        from mlxdist.runtime.engine import open_engine
    except ImportError:
        raise UserError("this build has no runtime engine (mlxdist.runtime.engine)")
    from mlxdist.runtime.config import EngineConfig
    from mlxdist.server.cli import start_engine
    progress(f"starting a {ranks}-rank local cluster (one process per rank, ring backend over 127.0.0.1) ...")
    t0 = time.monotonic()
    engine = start_engine(open_engine, str(model), EngineConfig(model_name=DEMO_NAME), ranks=ranks)
    try:
        server = ApiServer(engine, "127.0.0.1", 0, quiet=True).start()
        try:
            progress(f"up in {time.monotonic() - t0:.1f} s, OpenAI API at {server.url}/v1; asking: {question}")
            client = ChatClient(server.url)
            answer = Answer()
            try:
                for d in client.stream_chat([{"role": "user", "content": question}], model=engine.model_name,
                                            temperature=0.0, max_tokens=max_tokens):
                    note(answer, d)
                    click.echo(d.content, nl=False)
            except ChatError as e:
                raise UserError(f"the demo server failed to answer: {e}")
            answer.ended = time.monotonic()
            click.echo()
            rate = f", {answer.tokens_per_second:.1f} tok/s" if answer.tokens_per_second else ""
            ttft = f", first token {answer.ttft:.2f} s" if answer.ttft is not None else ""
            click.echo(f"({plural(answer.completion_tokens, 'token')}{rate}{ttft})", err=True)
        finally:
            server.shutdown()
    finally:
        engine.close()
