"""Test-time compute through the HTTP server and the official `openai` client (extra_body):
self-consistency with and without early stopping, best-of-N with a separate judge, beam
search and DVTS end to end, bad input, a failing candidate, a client that leaves. Over a
scripted fake engine: each candidate's text is chosen by its seed (or by the partial
solution it continues), and the judge answers with chosen P(Yes)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from typing import Callable, Iterator

import openai
import pytest
from fake_engine import EOS, FakeEngine, FakeHandle, FakeTokenizer

from mlxdist.runtime.api import GenerationRequest, TokenEvent
from mlxdist.server import verifier

YES, NO = 300, 301
QUESTION = "What is 6*7?"
PROMPT = f"<|user|>{QUESTION}\n<|assistant|>"


class Tokenizer(FakeTokenizer):
    def decode(self, tokens) -> str:
        return "".join({YES: "Yes", NO: "No"}.get(t, chr(t)) for t in tokens if t != EOS)


class ScriptedHandle(FakeHandle):
    """Judge prompts get one token with P(Yes) = engine.verdict(solution); other prompts the
    script's text for (assistant text so far, seed). "BLOCK:" texts wait until cancelled
    (10 s at most), "ERROR" fails. A stop string ends with a non-EOS token, as the engine's."""

    def __iter__(self) -> Iterator[TokenEvent]:
        e, r = self.engine, self.request
        prompt = e.tokenizer.decode(r.prompt_tokens)
        try:
            if "Answer Yes or No." in prompt:
                solution = prompt.split("Solution so far:\n", 1)[1].rsplit("\n\nIs the solution", 1)[0]
                p = e.verdict(solution)
                top = ((YES, math.log(p)), (NO, math.log(1 - p)), (ord("M"), math.log(1e-3)))
                yield TokenEvent(YES, "Yes", math.log(p), finish_reason="length", top_logprobs=top[:r.logprobs])
                return
            text = e.script(prompt.split("<|assistant|>", 1)[1], r.sampling.seed)
            if text.startswith("BLOCK:"):
                if self.cancelled.wait(10):
                    yield TokenEvent(None, "", finish_reason="cancelled")
                    return
                text = text[6:]
            if text == "ERROR":
                yield TokenEvent(None, "", finish_reason="error", error="scripted failure")
                return
            cuts = [text.index(s) for s in r.stop_strings if s in text]
            for i, ch in enumerate(text[: min(cuts)] if cuts else text):
                if self.cancelled.is_set():
                    yield TokenEvent(None, "", finish_reason="cancelled")
                    return
                last = i + 1 == r.max_tokens
                yield TokenEvent(ord(ch), ch, -0.5, finish_reason="length" if last else None)
                if last:
                    return
            yield TokenEvent(ord("\n") if cuts else EOS, "", -0.1, finish_reason="stop")
        finally:
            with e.lock:
                e.active -= 1
                e.finished += 1


class ScriptedEngine(FakeEngine):
    def __init__(self, script: Callable[[str, int | None], str] = lambda prefix, seed: "", verdict=lambda s: 0.5,
                 **kw) -> None:
        super().__init__(**kw)
        self.tokenizer = Tokenizer()
        self.script, self.verdict = script, verdict
        self.handles: list[ScriptedHandle] = []

    def submit(self, request: GenerationRequest) -> ScriptedHandle:
        with self.lock:
            self.requests.append(request)
            self.active += 1
            self.peak = max(self.peak, self.active)
            handle = ScriptedHandle(self, len(self.requests), request)
            self.handles.append(handle)
            return handle


def by_seed(texts: dict[int, str]) -> Callable[[str, int | None], str]:
    return lambda prefix, seed: texts[seed]


def ask(server, extra: dict, **kw):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
    return c.chat.completions.create(model="fake", messages=[{"role": "user", "content": QUESTION}],
                                     extra_body=extra, **kw)


def settle(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Wait for a condition the server reaches on its own (threads winding down)."""
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)
    return check()


def test_consensus_majority_vote_without_early_stop(make_server):
    texts = {10: "6*7 is 42.", 11: "<think>maybe 42</think>It is 41", 12: "42.0", 13: "I get 41", 14: "+42"}
    server = make_server(ScriptedEngine(by_seed(texts), max_concurrent=6))
    r = ask(server, {"consensus": {"n": 5, "early_stop": False}}, seed=10, temperature=0.7)
    ext = r.model_extra["consensus"]
    assert ext["answer"] == "42"
    assert ext["votes"] == [{"answer": "42", "count": 3}, {"answer": "41", "count": 2}]  # 41 in thinking: no vote
    assert [c.message.content for c in r.choices] == ["6*7 is 42.", "It is 41", "42.0", "I get 41", "+42"]
    assert [c.index for c in r.choices] == [0, 1, 2, 3, 4]
    assert r.choices[1].message.reasoning_content == "maybe 42" and r.choices[1].message.reasoning == "maybe 42"
    assert ext["candidates"] == [
        {"index": k, "answer": a, "finish_reason": "stop", "completion_tokens": len(texts[10 + k]) + 1}
        for k, a in enumerate(["42", "41", "42", "41", "42"])]
    assert (ext["stopped_early"], ext["cancelled"], ext["tokens_saved_estimate"]) == (False, 0, 0)
    assert r.usage.prompt_tokens == len(PROMPT)  # one prompt, shared
    assert r.usage.completion_tokens == sum(len(t) + 1 for t in texts.values())
    sent = server.engine.requests
    assert sorted(q.sampling.seed for q in sent) == [10, 11, 12, 13, 14]
    assert all(q.sampling.temperature == 0.7 and q.prompt_tokens == sent[0].prompt_tokens for q in sent)
    assert server.api.slots.active == 0


def test_consensus_chosen_first_and_reasoner_template(make_server):
    texts = {1: "I ponder 41.\n</think>\n\nSo 41", 2: "I ponder.\n</think>\n\nThe answer is 42",
             3: "Hm.\n</think>\n\nIt is 42.0"}
    server = make_server(ScriptedEngine(by_seed(texts), reasoner=True))
    r = ask(server, {"consensus": {"n": 3, "extract": "last_number", "early_stop": False}}, seed=1)
    assert r.model_extra["consensus"]["answer"] == "42"
    # the first candidate of the winning answer (seed 2) comes first, then the others in order
    assert [c.message.content for c in r.choices] == ["The answer is 42", "So 41", "It is 42.0"]
    assert [c.message.reasoning_content for c in r.choices] == ["I ponder.\n", "I ponder 41.\n", "Hm.\n"]
    assert [c["answer"] for c in r.model_extra["consensus"]["candidates"]] == ["42", "41", "42"]


def test_consensus_stops_early_once_the_leader_cannot_lose(make_server):
    answer = "The answer is 7"
    texts = {20: answer, 21: answer, 22: answer, 23: "BLOCK:The answer is 8", 24: "BLOCK:The answer is 8"}
    engine = ScriptedEngine(by_seed(texts), max_concurrent=5)
    server = make_server(engine)
    r = ask(server, {"consensus": {"n": 5}}, seed=20)  # the two blocked ones answer only once cancelled
    ext = r.model_extra["consensus"]
    # after three 7s, two remain: 3 > 0 + 2, decided
    assert (ext["answer"], ext["stopped_early"], ext["cancelled"]) == ("7", True, 2)
    assert ext["votes"] == [{"answer": "7", "count": 3}]
    assert ext["tokens_saved_estimate"] == 2 * (len(answer) + 1)  # the finished ones' mean, none generated yet
    assert ext["tokens_saved_at_most"] > 0
    assert [(c["answer"], c["finish_reason"], c["completion_tokens"]) for c in ext["candidates"]] == \
        [("7", "stop", 16)] * 3 + [(None, "cancelled", 0)] * 2
    assert r.usage.completion_tokens == 3 * 16
    assert all(h.cancelled.is_set() for h in engine.handles[3:])
    assert server.api.slots.active == 0


def test_best_of_n_weighted_by_a_separate_judge(make_server):
    texts = {5: "The answer is 42", 6: "The answer is 41", 7: "Maybe 42.0"}
    verdicts = {"The answer is 42": 0.3, "The answer is 41": 0.9, "Maybe 42.0": 0.4}
    server = make_server(ScriptedEngine(by_seed(texts)))
    judge = ScriptedEngine(verdict=verdicts.__getitem__)
    server.api.verifier = judge
    r = ask(server, {"search": {"strategy": "best_of_n", "n": 3}}, seed=5)
    ext = r.model_extra["search"]
    # 42 has two votes but 0.3 + 0.4 = 0.7 < 0.9 for 41
    assert ext["answer"] == "41"
    assert [c.message.content for c in r.choices] == ["The answer is 41", "The answer is 42", "Maybe 42.0"]
    assert ext["scores"] == pytest.approx([0.9, 0.3, 0.4])
    assert [(v["answer"], v["count"]) for v in ext["votes"]] == [("41", 1), ("42", 2)]
    assert [v["weight"] for v in ext["votes"]] == pytest.approx([0.9, 0.7])
    generated = sum(len(t) + 1 for t in texts.values())
    assert (ext["strategy"], ext["best"], ext["steps"], ext["generated_tokens"], ext["verifier_calls"]) == \
        ("best_of_n", 0, 1, generated, 3)
    assert r.usage.completion_tokens == generated and ext["verifier_usage"]["completion_tokens"] == 3
    assert len(server.engine.requests) == 3 and len(judge.requests) == 3  # the judge is not the policy
    assert all((q.max_tokens, q.sampling.temperature, q.logprobs) == (1, 0.0, 20) for q in judge.requests)
    assert all(QUESTION in judge.tokenizer.decode(q.prompt_tokens) for q in judge.requests)


def test_best_of_n_judged_by_the_served_model_itself(make_server):
    texts = {0: "It is 8", 1: "It is 9"}
    server = make_server(ScriptedEngine(by_seed(texts), verdict=lambda s: 0.8 if "9" in s else 0.2))
    r = ask(server, {"search": {"n": 2}}, seed=0)  # best_of_n is the default strategy
    assert r.model_extra["search"]["answer"] == "9" and r.choices[0].message.content == "It is 9"
    assert len(server.engine.requests) == 4  # two answers, then two judgements


def test_verifier_scores_every_pair_within_the_limit():
    judge = ScriptedEngine(verdict=lambda s: 0.25 if "8" in s else 0.75)

    async def main(limit):
        return await verifier.score(judge, asyncio.get_running_loop(), "Q?", ["It is 8", "It is 9", "8!"], limit=limit)

    assert asyncio.run(main(None)) == pytest.approx([0.25, 0.75, 0.25])
    judge.peak = 0
    assert asyncio.run(main(1)) == pytest.approx([0.25, 0.75, 0.25])
    assert judge.peak == 1 and len(judge.requests) == 6  # one at a time, each its own wave


STEPS = {"": "Let x = 6*7.\n\nmore", "Let x = 6*7.\n\n": "So x = 42.\n\nand more",
         "Let x = 6*7.\n\nSo x = 42.\n\n": "The answer is 42"}


@pytest.mark.parametrize("strategy", ["beam", "dvts"])
def test_step_search_end_to_end(make_server, strategy):
    engine = ScriptedEngine(lambda prefix, seed: STEPS[prefix], max_concurrent=4)
    server = make_server(engine)
    judge = ScriptedEngine(verdict=lambda s: 0.5)
    server.api.verifier = judge
    r = ask(server, {"search": {"strategy": strategy, "n": 2, "beam_width": 2, "max_steps": 5}}, seed=3,
            max_tokens=100)
    ext = r.model_extra["search"]
    solution = "Let x = 6*7.\n\nSo x = 42.\n\nThe answer is 42"
    assert [(c.message.content, c.finish_reason) for c in r.choices] == [(solution, "stop")] * 2
    assert ext["answer"] == "42" and [(v["answer"], v["count"]) for v in ext["votes"]] == [("42", 2)]
    # three rounds of 2 x 2 candidates: 12 steps generated and judged
    assert (ext["strategy"], ext["steps"], ext["verifier_calls"], len(judge.requests)) == (strategy, 3, 12, 12)
    tokens = 4 * (len("Let x = 6*7.") + 1) + 4 * (len("So x = 42.") + 1) + 4 * (len("The answer is 42") + 1)
    assert ext["generated_tokens"] == r.usage.completion_tokens == tokens
    sent = engine.requests
    assert len(sent) == 12 and all(q.stop_strings == ("\n\n",) for q in sent)
    assert sorted(engine.tokenizer.decode(q.prompt_tokens) for q in sent) == \
        sorted([PROMPT + p for p in STEPS for _ in range(4)])
    assert len({q.sampling.seed for q in sent}) == 12
    # max_tokens bounds a path in all: each step may use what its path has left of the 100
    step1, step2 = len("Let x = 6*7.") + 1, len("So x = 42.") + 1
    caps = {PROMPT: 100, PROMPT + "Let x = 6*7.\n\n": 100 - step1,
            PROMPT + "Let x = 6*7.\n\nSo x = 42.\n\n": 100 - step1 - step2}
    assert all(q.max_tokens == caps[engine.tokenizer.decode(q.prompt_tokens)] for q in sent)
    assert engine.peak <= 4 and server.api.slots.active == 0


@pytest.mark.parametrize("extra,kw,says", [
    ({"consensus": {"n": 2}, "search": {"n": 2}}, {}, "cannot be combined"),
    ({"consensus": {"n": 2}}, {"stream": True}, "'stream' cannot be combined with 'consensus'"),
    ({"consensus": {"n": 2}}, {"n": 2}, "'n' cannot be combined"),
    ({"consensus": {"n": 5}}, {}, "between 1 and 4"),
    ({"consensus": {"n": 0}}, {}, "between 1 and 4"),
    ({"consensus": {"extract": "regex:("}}, {}, "'consensus.extract'"),
    ({"consensus": {"extract": "median"}}, {}, "unknown extraction"),
    ({"consensus": {"early_stopp": True}}, {}, "unknown field 'consensus.early_stopp'"),
    ({"consensus": {"early_stop": "yes"}}, {}, "'consensus.early_stop' must be a boolean"),
    ({"consensus": 3}, {}, "'consensus' must be an object"),
    ({"search": {"strategy": "mcts"}}, {}, "'search.strategy' must be one of"),
    ({"search": {"verifier": "oracle"}}, {}, "'search.verifier' must be one of"),
    ({"search": {"beam_width": 9}}, {}, "between 1 and 4"),
    ({"search": {"max_steps": 0}}, {}, "'search.max_steps' must be between 1 and"),
    ({"search": {"strategy": "beam"}}, {"stop": ["x"]}, "'stop' cannot be combined"),
    ({"search": {}}, {"logprobs": True}, "'logprobs' cannot be combined"),
])
def test_bad_input_is_a_400(server, extra, kw, says):
    with pytest.raises(openai.BadRequestError) as e:
        ask(server, extra, **kw)
    assert says in e.value.message
    assert server.engine.requests == []


def test_a_failing_candidate_ends_the_request_with_500_only(make_server):
    engine = ScriptedEngine(by_seed({0: "BLOCK:7", 1: "ERROR", 2: "BLOCK:7"}))
    server = make_server(engine)
    with pytest.raises(openai.InternalServerError) as e:
        ask(server, {"consensus": {"n": 3}}, seed=0)
    assert "scripted failure" in e.value.message
    assert server.api.slots.active == 0
    assert settle(lambda: engine.active == 0)  # the blocked ones were cancelled
    assert all(h.cancelled.is_set() for h in engine.handles if h.request.sampling.seed != 1)
    engine.script = by_seed({0: "9", 1: "9", 2: "8"})
    assert ask(server, {"consensus": {"n": 3}}, seed=0).model_extra["consensus"]["answer"] == "9"


def test_client_leaving_cancels_every_candidate(make_server):
    engine = ScriptedEngine(lambda prefix, seed: "BLOCK:7")
    server = make_server(engine)
    body = json.dumps({"model": "fake", "messages": [{"role": "user", "content": QUESTION}],
                       "consensus": {"n": 3}}).encode()
    sock = socket.create_connection(server.address, timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert settle(lambda: len(engine.handles) == 3)
    sock.close()
    assert settle(lambda: all(h.cancelled.is_set() for h in engine.handles) and engine.active == 0)
    assert settle(lambda: server.api.slots.active == 0)
    assert settle(lambda: server.api.metrics.cancelled == 1)


def test_requests_wait_for_slots_and_all_are_served(make_server):
    engine = ScriptedEngine(lambda prefix, seed: "The answer is 5", max_concurrent=4)
    server = make_server(engine)
    results: list = []

    def one() -> None:
        results.append(ask(server, {"consensus": {"n": 3, "early_stop": False}}, seed=1))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert [r.model_extra["consensus"]["answer"] for r in results] == ["5"] * 4
    assert engine.peak <= 4 and server.api.slots.active == 0
