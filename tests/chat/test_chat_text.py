"""What the chat says about counts reads right for one: "1 token", "1 answer", "1 message"."""

from __future__ import annotations

import io

from mlxdist.chat.client import Answer, ChatClient
from mlxdist.chat.repl import Repl, _timings


def test_one_token_one_answer_one_message() -> None:
    assert _timings(Answer(completion_tokens=1)) == "1 token"
    assert _timings(Answer(completion_tokens=2)) == "2 tokens"
    out = io.StringIO()
    repl = Repl(ChatClient("http://127.0.0.1:9"), {}, out=out)
    s = repl.session
    s.answers, s.tokens, s.messages = 1, 1, [{"role": "user", "content": "hi"}]
    assert repl.command("/stats")
    assert out.getvalue().splitlines()[-1] == "session: 1 answer, 1 token, 1 message"
