"""Whatever JSON arrives, request parsing either accepts it or raises a 4xx ApiError, and
the live server answers every such body with a status below 500 (never dies of one)."""

from __future__ import annotations

import http.client
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxdist.server.protocol import ApiError, parse_chat, parse_completion

SCALARS = st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8)
JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                                         max_size=3), max_leaves=8)
KEYS = ["model", "messages", "prompt", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n",
        "temperature", "top_p", "top_k", "min_p", "stop", "seed", "logprobs", "top_logprobs", "echo"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bot", 3]),
                                 "content": JSON})
BODIES = st.dictionaries(st.sampled_from(KEYS), JSON | st.lists(MESSAGE, max_size=2), max_size=6) | JSON


@settings(max_examples=400, deadline=None)
@given(BODIES)
def test_parsing_accepts_or_raises_a_4xx(body):
    for parse in (parse_chat, parse_completion):
        try:
            parse(body, "fake", 4)
        except ApiError as e:
            assert 400 <= e.status < 500 and e.message


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(BODIES)
def test_server_answers_every_body_below_500(server, body):
    host, port = server.address
    for path in ("/v1/chat/completions", "/v1/completions"):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("POST", path, json.dumps(body, allow_nan=True), {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        assert r.status < 500, data
