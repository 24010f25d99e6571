"""CLI for `mlxdist chat`: a terminal chat against a running server (--url) or against a
model loaded here (MODEL, served in-process on a private port)."""

from __future__ import annotations

import click

from mlxdist.errors import UserError


@click.command("chat")
@click.argument("model", required=False)
@click.option("--url", default=None, help="A server's URL (default http://127.0.0.1:8080 when no MODEL).")
@click.option("--api-key", default=None, envvar="MLXDIST_API_KEY", help="Bearer key for the server.")
@click.option("--local", type=int, default=None, help="With MODEL: run N ranks on this machine.")
@click.option("--system", "system", default=None, help="System prompt.")
@click.option("--temperature", default=0.6, show_default=True, type=float)
@click.option("--top-p", default=0.95, show_default=True, type=float)
@click.option("--max-tokens", default=None, type=click.IntRange(min=1), help="Cap on each answer's length.")
@click.option("--think", "thinking_budget", default=None, type=click.IntRange(min=0), metavar="N",
              help="Thinking budget: at most N tokens of reasoning per answer (/think N or /think off to change).")
def chat_command(model: str | None, url: str | None, api_key: str | None, local: int | None, system: str | None,
                 temperature: float, top_p: float, max_tokens: int | None, thinking_budget: int | None) -> None:
    """Chat in the terminal with a server (--url) or with MODEL loaded here."""
    from mlxdist.chat.client import ChatClient, ChatError
    from mlxdist.chat.repl import Repl, default_history_file

    if model and url:
        raise UserError("give a MODEL or --url, not both")
    server = engine = None
    if model:
        from mlxdist.runtime.stage import note_if_upcast
        from mlxdist.server.app import ApiServer
        from mlxdist.runtime.config import EngineConfig
        from mlxdist.server.cli import DEFAULT_PROMPT_CACHE, open_engine_for

        note_if_upcast(model)  # float16 runs as float32 on the CPU backend: said here, not in worker logs
        # each turn resends the conversation: the previous turn's caches are its prefix
        engine = open_engine_for(model, local, None, EngineConfig(prompt_cache=DEFAULT_PROMPT_CACHE),
                                 progress=lambda m: click.echo(m, err=True))
        server = ApiServer(engine, "127.0.0.1", 0, quiet=True).start()
        url = server.url
    client = ChatClient(url or "http://127.0.0.1:8080", api_key)
    try:
        try:
            name = client.model()
        except ChatError as e:
            raise UserError(f"the server at {client.url} refused: {e}")
        params = {"model": name, "temperature": temperature, "top_p": top_p}
        if max_tokens:
            params["max_tokens"] = max_tokens
        if thinking_budget is not None:  # a request field: a local MODEL gets it through the same server
            params["thinking_budget"] = thinking_budget
        Repl(client, params, history_file=default_history_file(), system=system).run()
    finally:
        if server is not None:
            server.shutdown()
        if engine is not None:
            engine.close()
