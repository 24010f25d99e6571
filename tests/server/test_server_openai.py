"""The server driven by the official `openai` client, over the fake engine: chat and
completions, streaming and not, reasoning, usage, finish_reason, parameters passed on."""

from __future__ import annotations

import openai
import pytest
from fake_engine import FakeEngine


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_models_and_health(server):
    c = client(server)
    assert [m.id for m in c.models.list()] == ["fake"]
    import json
    import urllib.request

    with urllib.request.urlopen(server.url + "/health") as r:
        assert json.load(r)["status"] == "ok"


def test_chat_whole(server):
    r = client(server).chat.completions.create(
        model="fake", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        temperature=0.3, top_p=0.9, seed=7)
    assert r.choices[0].message.content == "Answer to hello"
    assert r.choices[0].finish_reason == "stop"
    assert getattr(r.choices[0].message, "reasoning_content", None) is None
    prompt = "<|system|>be brief\n<|user|>hello\n<|assistant|>"
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len("Answer to hello") + 1  # + EOS
    sent = server.engine.requests[-1]
    assert sent.sampling.temperature == 0.3 and sent.sampling.top_p == 0.9 and sent.sampling.seed == 7
    assert sent.max_tokens == server.engine.context_length - len(prompt)  # default: up to the context


def test_chat_stream_with_reasoning_and_usage(server):
    chunks = list(client(server).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "think: why"}], stream=True,
        stream_options={"include_usage": True}))
    reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert reasoning == "I ponder think: why.\n"
    assert content == "Answer to think: why"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(answer_text("think: why")) + 1
    assert all(ch.usage is None for ch in chunks[:-1])


def answer_for_text(q: str) -> str:
    from fake_engine import answer_for

    return answer_for(f"<|user|>{q}\n<|assistant|>")


answer_text = answer_for_text


def test_template_that_opens_think(make_server):
    server = make_server(FakeEngine(reasoner=True))
    r = client(server).chat.completions.create(model="fake", messages=[{"role": "user", "content": "2+2"}])
    assert r.choices[0].message.reasoning_content == "I ponder 2+2.\n"
    assert r.choices[0].message.content == "Answer to 2+2"


def test_max_tokens_stop_and_n(server):
    c = client(server)
    r = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == ("Answ", "length", 4)
    r = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hello"}],
                                  max_completion_tokens=3)
    assert r.choices[0].message.content == "Ans"
    r = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hello"}], stop=["to"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Answer ", "stop")
    assert server.engine.requests[-1].stop_strings == ("to",)
    r = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], n=3, seed=1)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert all(ch.message.content == "Answer to hi" for ch in r.choices)
    assert sorted(q.sampling.seed for q in server.engine.requests[-3:]) == [1, 2, 3]
    assert r.usage.completion_tokens == 3 * (len("Answer to hi") + 1)


def test_completions_whole_and_stream(server):
    c = client(server)
    r = c.completions.create(model="fake", prompt="abc", max_tokens=6, logprobs=1)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("Answer", "length")
    assert r.choices[0].logprobs.tokens == list("Answer")
    assert r.choices[0].logprobs.token_logprobs == [-0.5] * 6
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 6
    chunks = list(c.completions.create(model="fake", prompt=["ab", "cd"], stream=True,
                                       stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.text
    assert texts == {0: "Answer to ab", 1: "Answer to cd"}
    assert chunks[-1].usage.prompt_tokens == 4
    r = c.completions.create(model="fake", prompt=[104, 105])  # token ids
    assert r.choices[0].text == "Answer to hi"


def test_chat_logprobs(server):
    r = client(server).chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}],
                                               logprobs=True, max_tokens=3)
    assert [t.token for t in r.choices[0].logprobs.content] == list("Ans")
    assert [t.logprob for t in r.choices[0].logprobs.content] == [-0.5] * 3
    assert all(t.top_logprobs == [] for t in r.choices[0].logprobs.content)


def test_top_logprobs_listed(server):
    """The alternatives the engine reports, as OpenAI's clients parse them: chat lists
    {token, logprob, bytes} per position, completions a {token: logprob} map."""
    c = client(server)
    r = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}],
                                  logprobs=True, top_logprobs=2, max_tokens=3)
    assert server.engine.requests[-1].logprobs == 2
    tops = [[(a.token, a.logprob, a.bytes) for a in t.top_logprobs] for t in r.choices[0].logprobs.content]
    assert tops == [[(ch, -0.5, [ord(ch)]), (chr(ord(ch) + 1), -1.5, [ord(ch) + 1])] for ch in "Ans"]
    r = c.completions.create(model="fake", prompt="abc", max_tokens=2, logprobs=3)
    assert r.choices[0].logprobs.top_logprobs == [
        {ch: -0.5, chr(ord(ch) + 1): -1.5, chr(ord(ch) + 2): -2.5} for ch in "An"]
    chunks = list(c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}],
                                            logprobs=True, top_logprobs=1, max_tokens=2, stream=True))
    streamed = [t for ch in chunks for choice in ch.choices if choice.logprobs for t in choice.logprobs.content]
    assert [[a.token for a in t.top_logprobs] for t in streamed] == [["A"], ["n"]]


def test_api_key(make_server):
    server = make_server(api_key="s3cret")
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").models.list()
    assert [m.id for m in client(server, "s3cret").models.list()] == ["fake"]
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "/v1/models")
    assert e.value.code == 401
    with urllib.request.urlopen(server.url + "/health") as r:  # health checks need no key
        assert r.status == 200
