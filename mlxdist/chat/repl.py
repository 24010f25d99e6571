"""The terminal chat loop: stream answers, show reasoning dimmed and fold it away once the
answer comes, keep history with readline, and a few slash commands."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from mlxdist.chat.client import Answer, ChatClient, ChatError, note
from mlxdist.errors import plural

DIM, RESET, BOLD = "\033[2m", "\033[0m", "\033[1m"
HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /system [TEXT]  set the system prompt (no TEXT: remove it)
  /save FILE      save the conversation as JSON
  /load FILE      load a conversation saved with /save
  /stats          timings of the last answer and of this session
  /think          show the last answer's reasoning in full
  /think N        allow N tokens of thinking per answer from now on
  /think off      no thinking budget (the model thinks as long as it likes)
  /help           this text
Ctrl-C stops an answer; Ctrl-D (or /quit) leaves."""


@dataclass
class Session:
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    last: Answer | None = None
    answers: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def payload(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages


class Repl:
    def __init__(self, client: ChatClient, params: dict[str, Any], out: TextIO = sys.stdout,
                 history_file: Path | None = None, system: str | None = None) -> None:
        self.client, self.params, self.out = client, params, out
        self.tty = out.isatty()
        self.session = Session(system=system)
        self.history_file = history_file

    # ---- output ---------------------------------------------------------------------------

    def write(self, text: str, style: str = "") -> None:
        if style and self.tty:
            text = style + text + RESET
        self.out.write(text)
        self.out.flush()

    def info(self, text: str) -> None:
        self.write(text + "\n", DIM)

    # ---- the loop -------------------------------------------------------------------------

    def run(self, read: Callable[[str], str] = input) -> None:
        self._load_history()
        budget = self.params.get("thinking_budget")
        note_budget = "" if budget is None else f", thinking budget {plural(budget, 'token')}"
        self.info(f"chatting with {self.params.get('model', '?')} at {self.client.url}{note_budget}; "
                  "/help for commands")
        try:
            while True:
                try:
                    line = read(">>> ")
                except KeyboardInterrupt:
                    self.write("\n")
                    continue
                except EOFError:
                    self.write("\n")
                    return
                line = line.strip()
                if not line:
                    continue
                if line.startswith("/"):
                    if not self.command(line):
                        return
                    continue
                self.ask(line)
        finally:
            self._save_history()

    def ask(self, question: str) -> None:
        s = self.session
        s.messages.append({"role": "user", "content": question})
        answer = Answer()
        budget = self.params.get("thinking_budget")
        view = _ReasoningView(self)
        interrupted = False
        try:
            for d in self.client.stream_chat(s.payload(), **self.params):
                note(answer, d)
                if d.reasoning:
                    view.add(d.reasoning)
                if d.content:
                    view.fold(answer)
                    self.write(d.content)
        except KeyboardInterrupt:
            interrupted = True
            self.client.close()  # the server sees the connection close and cancels
        except ChatError as e:
            view.fold(answer)
            self.write(f"\nerror: {e}\n")
            s.messages.pop()
            return
        answer.ended = time.monotonic()
        view.fold(answer)
        if interrupted:
            self.write(" [stopped]", DIM)
        self.write("\n")
        if answer.reasoning:  # said after the answer: the token count comes in the last chunk
            self.info(thinking_summary(answer, budget))
        s.last, s.answers = answer, s.answers + 1
        s.tokens += answer.completion_tokens
        if answer.first_token is not None:
            s.seconds += answer.ended - answer.first_token
        # the reasoning is not sent back to the model (DeepSeek's rule for R1)
        s.messages.append({"role": "assistant", "content": answer.content})
        self.info(_timings(answer))

    # ---- commands -------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run one slash command; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.info(HELP)
        elif name == "/reset":
            s.messages.clear()
            self.info("conversation forgotten")
        elif name == "/system":
            s.system = arg or None
            self.info(f"system prompt set: {arg}" if arg else "system prompt removed")
        elif name == "/save":
            if not arg:
                return self._usage("/save FILE")
            try:
                tmp = Path(arg + ".tmp")
                tmp.write_text(json.dumps({"system": s.system, "messages": s.messages}, indent=1))
                tmp.replace(arg)
                self.info(f"saved {len(s.messages)} messages to {arg}")
            except OSError as e:
                self.info(f"cannot save: {e}")
        elif name == "/load":
            if not arg:
                return self._usage("/load FILE")
            try:
                data = json.loads(Path(arg).read_text())
                s.system, s.messages = data.get("system"), list(data["messages"])
                self.info(f"loaded {plural(len(s.messages), 'message')} from {arg}")
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.info(f"cannot load {arg}: {e}")
        elif name == "/stats":
            if s.last is not None:
                self.info("last answer: " + _timings(s.last))
            rate = f", {s.tokens / s.seconds:.1f} tok/s" if s.seconds else ""
            self.info(f"session: {plural(s.answers, 'answer')}, {plural(s.tokens, 'token')}{rate}, "
                      f"{plural(len(s.messages), 'message')}")
        elif name == "/think" and arg:
            self._set_budget(arg)
        elif name == "/think":
            if s.last is not None and s.last.reasoning:
                self.write(s.last.reasoning.strip() + "\n", DIM)
            else:
                self.info("the last answer had no reasoning")
        else:
            self.info(f"unknown command {name}; /help lists them")
        return True

    def _set_budget(self, arg: str) -> None:
        """`/think N` or `/think off`: the thinking budget sent with the following questions."""
        if arg == "off":
            self.params.pop("thinking_budget", None)
            self.info("thinking budget removed")
            return
        budget = parse_budget(arg)
        if budget is None:
            self._usage("/think [N|off]  (N: tokens of thinking, a whole number >= 0)")
            return
        self.params["thinking_budget"] = budget
        self.info(f"thinking budget: {plural(budget, 'token')} per answer")

    def _usage(self, text: str) -> bool:
        self.info(f"usage: {text}")
        return True

    # ---- readline -------------------------------------------------------------------------

    def _load_history(self) -> None:
        try:
            import readline
        except ImportError:
            return
        if self.history_file and self.history_file.exists():
            try:
                readline.read_history_file(str(self.history_file))
            except OSError:
                pass

    def _save_history(self) -> None:
        try:
            import readline
        except ImportError:
            return
        if self.history_file:
            try:
                readline.set_history_length(1000)
                readline.write_history_file(str(self.history_file))
            except OSError:
                pass


class _ReasoningView:
    """Reasoning streams dimmed; when the answer starts (or ends) it is folded into one
    line: on a terminal the dimmed lines are erased, elsewhere they are left as they are."""

    def __init__(self, repl: Repl) -> None:
        self.repl, self.text, self.folded = repl, "", False

    def add(self, piece: str) -> None:
        if not self.text:  # dim from here until folded (per-piece codes would split words)
            self.repl.write((DIM if self.repl.tty else "") + "thinking: ")
        self.text += piece
        self.repl.write(piece)

    def fold(self, answer: Answer) -> None:
        """Put the reasoning away; its summary line (`thinking_summary`) comes after the answer."""
        if self.folded or not self.text:
            return
        self.folded = True
        if self.repl.tty:
            self.repl.write(RESET)
        cols, rows = shutil.get_terminal_size()
        lines = sum(max(1, math.ceil(len(part) / cols)) for part in ("thinking: " + self.text).split("\n"))
        if self.repl.tty and lines < rows:
            up = f"\033[{lines - 1}A" if lines > 1 else ""
            self.repl.write(f"\r{up}\033[J")
        else:
            self.repl.write("\n")


def parse_budget(text: str) -> int | None:
    """A thinking budget typed after `/think`: a whole number >= 0, else None."""
    try:
        budget = int(text)
    except ValueError:
        return None
    return budget if budget >= 0 else None


def thinking_summary(answer: Answer, budget: int | None = None) -> str:
    """`[thought for 3.2 s, 412/512 tokens; /think shows it]`: tokens as the server counted
    them (out of the budget, when one was set), words when the server gave no count."""
    end = answer.reasoning_done or answer.ended or time.monotonic()
    seconds = end - (answer.first_token or answer.started)
    if answer.reasoning_tokens is not None:
        size = (f"{answer.reasoning_tokens}/{budget} tokens" if budget is not None
                else plural(answer.reasoning_tokens, "token"))
    else:
        size = plural(len(answer.reasoning.split()), "word")
        if budget is not None:
            size += f" (budget {plural(budget, 'token')})"
    return f"[thought for {seconds:.1f} s, {size}; /think shows it]"


def _timings(a: Answer) -> str:
    parts = [plural(a.completion_tokens, "token")]
    if a.tokens_per_second is not None:
        parts.append(f"{a.tokens_per_second:.1f} tok/s")
    if a.ttft is not None:
        parts.append(f"first token {a.ttft:.2f} s")
    if a.finish_reason == "length":
        parts.append("cut at max tokens")
    return ", ".join(parts)


def default_history_file() -> Path:
    return Path(os.environ.get("MLXDIST_CHAT_HISTORY", Path.home() / ".mlxdist_chat_history"))
