"""The web console (docs/console.md) in a real headless Chromium: chat over the fake engine
(scripted answers, so the expected text is known exactly), stop, the API key, and the
cluster view of a real `mlxdist serve TINY --local 2` whose rank 1 is killed."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
from browser import browser_fixture  # noqa: F401 (the `browser` fixture)
from browser import (browser_missing, http_get, local_storage, make_tiny, metric_value, serve, severe_errors,
                     wait_browser, wait_until)
from fake_engine import FakeEngine

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))

PAGE_FILES = ("/", "/console/console.css", "/console/console.js")
MAX_PAGE_BYTES = 200_000
CHAT_OK = 'mlxdist_requests_total{endpoint="/v1/chat/completions",status="200"}'
CANCELLED = "mlxdist_requests_cancelled_total"


# ---- page helpers ---------------------------------------------------------------------------

def by_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def one(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def open_console(driver, url: str) -> None:
    driver.get(url)
    wait_browser(driver, lambda d: d.execute_script("return document.readyState") == "complete"
                 and by_css(d, "#chat-input"), 10, "the page with #chat-input")


def ask(driver, question: str) -> None:
    from selenium.webdriver.support import expected_conditions as ec

    box = wait_browser(driver, ec.element_to_be_clickable(("css selector", "#chat-input")), 10, "#chat-input usable")
    box.clear()
    box.send_keys(question)
    wait_browser(driver, ec.element_to_be_clickable(("css selector", "#send")), 10, "#send enabled").click()


def answers(driver) -> list[str]:
    return [e.text for e in by_css(driver, "#messages .msg.assistant .answer")]


def wait_answer(driver, expected: str, timeout: float = 15) -> None:
    wait_browser(driver, lambda d: answers(d) and answers(d)[-1] == expected, timeout,
                 f"the last .msg.assistant .answer to read {expected!r}", seen=answers)


def conversation(driver) -> list[tuple[str, str]]:
    out = []
    for m in by_css(driver, "#messages .msg"):
        classes = m.get_attribute("class").split()
        role = "user" if "user" in classes else "assistant" if "assistant" in classes else "?"
        text = m.text if role == "user" else " ".join(a.text for a in m.find_elements("css selector", ".answer"))
        out.append((role, text.strip()))
    return out


def no_severe(driver) -> None:
    errors = severe_errors(driver)
    assert not errors, "SEVERE browser console messages:\n" + "\n".join(e["message"] for e in errors)


# ---- the page ----------------------------------------------------------------------------------

def test_page_loads_clean_and_light(browser, make_server):
    server = make_server(FakeEngine())
    sizes = {}
    for path in PAGE_FILES:
        status, body, headers = http_get(server.url + path)
        assert status == 200, (path, status, body[:200])
        sizes[path] = len(body)
    assert sum(sizes.values()) < MAX_PAGE_BYTES, sizes
    open_console(browser, server.url + "/")
    for sel in ("#tab-chat", "#tab-cluster", "#view-chat", "#view-cluster", "#messages", "#chat-input",
                "#send", "#stop", "#new-chat"):
        assert by_css(browser, sel), f"{sel} is missing"
    assert one(browser, "#view-chat").is_displayed() and not one(browser, "#view-cluster").is_displayed()
    wait_browser(browser, lambda d: {"console.css", "console.js"} <= set(d.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name.split('/').pop())")), 10,
        "console.css and console.js loaded")
    no_severe(browser)


# ---- chat over the fake engine ---------------------------------------------------------------

def test_chat_answers_thinks_and_survives_a_reload(browser, make_server):
    server = make_server(FakeEngine())
    open_console(browser, server.url + "/")
    ask(browser, "what is the capital of France")
    wait_answer(browser, "Answer to what is the capital of France")
    assert by_css(browser, "#messages .msg.user")[-1].text.strip() == "what is the capital of France"

    q = "think: why is the sky blue"
    ask(browser, q)
    wait_answer(browser, f"Answer to {q}")
    last = by_css(browser, "#messages .msg.assistant")[-1]
    (details,) = last.find_elements("css selector", "details.thinking")
    assert details.get_attribute("open") is None, "the thinking is shown unfolded"
    summary = details.find_element("css selector", "summary").text
    m = re.search(r"Thought for (\d+) tokens?", summary)
    assert m and int(m.group(1)) > 0, summary
    assert f"I ponder {q}." in details.get_attribute("textContent")
    assert f"I ponder {q}" not in last.find_element("css selector", ".answer").get_attribute("textContent")
    details.find_element("css selector", "summary").click()  # unfolds
    wait_browser(browser, lambda d: f"I ponder {q}." in details.text, 5, "the thinking shown when unfolded")
    # the first answer had no thinking
    assert not by_css(browser, "#messages .msg.assistant")[0].find_elements("css selector", ".thinking")

    before = conversation(browser)
    assert before == [("user", "what is the capital of France"), ("assistant", "Answer to what is the capital of France"),
                      ("user", q), ("assistant", f"Answer to {q}")], before
    assert local_storage(browser, "mlxdist.chat")
    browser.refresh()
    wait_browser(browser, lambda d: conversation(d) == before, 10, "the conversation back after a reload",
                 seen=conversation)
    no_severe(browser)

    # the model saw the whole conversation: the second request carried the first turn
    assert engine_messages(server)[-3:] == [
        {"role": "user", "content": "what is the capital of France"},
        {"role": "assistant", "content": "Answer to what is the capital of France"},
        {"role": "user", "content": q}]

    one(browser, "#new-chat").click()
    wait_browser(browser, lambda d: not by_css(d, "#messages .msg"), 5, "#new-chat to empty the conversation")
    open_console(browser, server.url + "/")
    assert not by_css(browser, "#messages .msg"), "the forgotten conversation came back after a reload"


def engine_messages(server) -> list[dict]:
    """The messages of the engine's last request (the fake engine's prompt is
    `<|role|>content` lines)."""
    prompt = server.engine.tokenizer.decode(server.engine.requests[-1].prompt_tokens)
    return [{"role": r, "content": c} for r, c in re.findall(r"<\|(\w+)\|>([^\n]*)\n", prompt)]


def test_stop_cancels_the_request_on_the_server(browser, make_server):
    from selenium.webdriver.support import expected_conditions as ec

    engine = FakeEngine(delay=0.2)
    server = make_server(engine)
    open_console(browser, server.url + "/")
    q = "a long question to stop"
    full = f"Answer to {q}"
    ask(browser, q)
    wait_browser(browser, lambda d: answers(d) and answers(d)[-1], 10, "the first characters of the answer")
    wait_browser(browser, ec.element_to_be_clickable(("css selector", "#stop")), 5, "#stop enabled").click()
    wait_until(lambda: metric_value(server.url, CANCELLED) == 1, 10,
               f"{CANCELLED} to become 1 after #stop")
    wait_until(lambda: engine.stats()["active"] == 0, 10, "the engine's request to end after #stop")
    # the page notes the stop inside .answer (a `.stopped` paragraph): the model's text is the rest
    last = by_css(browser, "#messages .msg.assistant .answer")[-1]
    shown = browser.execute_script(
        "const c = arguments[0].cloneNode(true); c.querySelectorAll('.stopped').forEach(e => e.remove());"
        "return c.textContent.trim();", last)
    assert shown and full.startswith(shown) and shown != full, shown  # a part of the answer, and no more came
    assert metric_value(server.url, "mlxdist_active_requests") == 0
    assert json.loads(http_get(server.url + "/v1/cluster")[1])["live"]["cancelled"] == 1

    engine.delay = 0.0  # the page works on after a stop
    ask(browser, "next one")
    wait_answer(browser, "Answer to next one")
    no_severe(browser)


def test_api_key_asked_after_a_401_then_used(browser, make_server):
    server = make_server(FakeEngine(), api_key="s3cret")
    status, _, _ = http_get(server.url + "/")
    assert status == 200  # the page needs no key
    open_console(browser, server.url + "/")
    ask(browser, "hello there")
    key = wait_browser(browser, lambda d: [e for e in by_css(d, "#api-key") if e.is_displayed()], 10,
                       "#api-key shown after a 401")[0]
    key.send_keys("s3cret\n")  # submits the key form
    wait_browser(browser, lambda d: local_storage(d, "mlxdist.key") == "s3cret", 5,
                 "the key kept in localStorage under mlxdist.key")
    ask(browser, "second question")
    wait_answer(browser, "Answer to second question")
    assert metric_value(server.url, CHAT_OK, key="s3cret") >= 1


def test_api_key_from_the_url(browser, make_server):
    server = make_server(FakeEngine(), api_key="s3cret")
    open_console(browser, server.url + "/?key=s3cret")
    ask(browser, "hello there")
    wait_answer(browser, "Answer to hello there")
    assert not [e for e in by_css(browser, "#api-key") if e.is_displayed()], "asked for a key given in the URL"
    no_severe(browser)


# ---- the cluster view of a real `mlxdist serve --local 2` ------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("console") / "tiny", layers=4)


def test_cluster_view_plan_and_a_killed_rank(browser, tiny):
    with serve(tiny, local=2) as s:
        status, body, _ = http_get(s.url + "/v1/cluster")
        assert status == 200, body[:300]
        cluster = json.loads(body)
        assert [st["layers"] for st in cluster["stages"]] == [[0, 2], [2, 4]], cluster["stages"]
        assert [st["rank"] for st in cluster["stages"]] == [0, 1]

        open_console(browser, s.url + "/")
        # a real answer: the page sets no temperature, so only "something came, and was counted"
        ask(browser, "hi")
        wait_until(lambda: metric_value(s.url, CHAT_OK) == 1, 30, "one completed chat request in /metrics")
        wait_browser(browser, lambda d: by_css(d, "#messages .msg.assistant .answer")
                     and by_css(d, "#messages .msg.assistant .answer")[-1].get_attribute("textContent"),
                     10, "a non-empty answer from the tiny model")

        one(browser, "#tab-cluster").click()
        wait_browser(browser, lambda d: one(d, "#view-cluster").is_displayed()
                     and not one(d, "#view-chat").is_displayed(), 5, "#view-cluster shown instead of #view-chat")
        for st in cluster["stages"]:
            r, (a, b) = st["rank"], st["layers"]
            text = f"rank {r}: layers {a}-{b - 1}"  # [start, end) shown inclusive
            wait_browser(browser, lambda d: [e for e in by_css(d, f'#plan .stage[data-rank="{r}"]')
                                             if text in e.text], 10, f"#plan .stage[data-rank={r}] reading {text!r}",
                         seen=lambda d: [e.text for e in by_css(d, "#plan .stage")])
        assert [e.text for e in by_css(browser, "#plan .stage")] == ["rank 0: layers 0-1", "rank 1: layers 2-3"]
        for node in cluster["nodes"]:
            card = wait_browser(browser, lambda d: by_css(d, f'#nodes .node-card[data-node="{node["name"]}"]'), 10,
                                f"the card of node {node['name']}")[0]
            assert node["name"] in card.text
            for part in (".mem-weights", ".mem-kv", ".mem-free"):
                assert card.find_elements("css selector", part), f"{part} missing in the node card"
        for sel in ("#live-tps", "#live-queue", "#live-ttft", "#live-hits"):
            assert by_css(browser, sel), f"{sel} is missing"
        no_severe(browser)

        def rank1_events(d) -> list[str]:
            return [e.text for e in by_css(d, "#events .event") if re.search(r"\brank 1\b", e.text)]

        assert rank1_events(browser) == [], "events about rank 1 before it was killed"
        victim = s.rank_pid(1)
        os.kill(victim, signal.SIGKILL)
        wait_browser(browser, rank1_events, 60, "an #events .event about rank 1 after killing it",
                     seen=lambda d: [e.text for e in by_css(d, "#events .event")])
        # the server heals; the log shows its events newest first
        wait_until(lambda: json.loads(http_get(s.url + "/health")[1])["status"] == "ok"
                   and s.rank_pid(1) != victim, 60, "the server healed")

        def newest_first(d) -> bool:
            events = json.loads(http_get(s.url + "/v1/cluster")[1])["events"]
            shown = by_css(d, "#events .event")
            return events and shown and events[-1]["message"] in shown[0].text
        wait_browser(browser, newest_first, 10, "the newest event (of /v1/cluster) first in #events",
                     seen=lambda d: [e.text for e in by_css(d, "#events .event")])
        kinds = [e["event"] for e in json.loads(http_get(s.url + "/v1/cluster")[1])["events"]]
        assert "restarted" in kinds or "restarting" in kinds, kinds


def test_markdown_is_rendered_and_html_is_not(browser, make_server):
    """The (scripted) answer repeats the question: its markdown becomes elements, the
    HTML in it stays text, and only http(s) links become links."""
    server = make_server(FakeEngine())
    open_console(browser, server.url + "/")
    ask(browser, "**bold** and `x<y>` and [a link](http://example.com) and <b>raw</b> and [bad](javascript:alert(1))")
    wait_browser(browser, lambda d: answers(d) and "raw" in answers(d)[-1], 15, "the answer")
    answer = by_css(browser, "#messages .msg.assistant .answer")[-1]
    assert [e.text for e in answer.find_elements("css selector", "strong")] == ["bold"]
    assert [e.text for e in answer.find_elements("css selector", "code")] == ["x<y>"]
    links = answer.find_elements("css selector", "a")
    assert [(a.text, a.get_attribute("href")) for a in links] == [("a link", "http://example.com/")]
    assert not answer.find_elements("css selector", "b") and "<b>raw</b>" in answer.text
    no_severe(browser)
