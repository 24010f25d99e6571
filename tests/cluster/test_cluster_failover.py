"""A cluster on one machine, as docs/cluster.md's trial: two real `mlxdist node` processes
on 127.0.0.1 (`--address 127.0.0.1`, their own ports and data dirs) and the model served
over them with `open_cluster_engine(..., "127.0.0.1:PA,127.0.0.1:PB")`. Node B gets SIGTERM
mid-stream: the failover must name B as the node lost, finish with the tokens of
single-process mlx-lm and stream exactly the text of an uninterrupted run. The tokenizer
is SentencePiece-style (every token "▁tN"), whose streaming detokenizer drops the leading
space of a request's first token, so a re-prefill that restarts detokenization at the
seam shows as two words run together. Then B comes back and the model moves back, logged.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cluster_fixtures import make_shards, node_process, reference_tokens, stop_process, tiny_model

CLUSTER = "trial"
PROMPT = (1, 2, 3)  # greedy output of the tiny model runs 400 tokens without </s>
MAX_TOKENS = 400
EOS = 257


def spm_tokenizer(model_dir: Path) -> None:
    """Replace the tiny model's byte-level tokenizer by a SentencePiece-style one over the
    same ids: token i < 256 is "▁t<i>", then <s> </s> <pad>; mlx-lm picks its
    SPMStreamingDetokenizer for the decoder below."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    for p in model_dir.iterdir():
        if p.name.startswith(("tokenizer", "special_")) or p.name == "chat_template.jinja":
            p.unlink()
    vocab = {f"\u2581t{i}": i for i in range(256)}
    vocab.update({"<s>": 256, "</s>": EOS, "<pad>": 258})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(model_dir))


class Nodes:
    """`mlxdist node` processes on 127.0.0.1, as a user starts them for a trial."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.secret = tmp / "secret"
        self.secret.write_text("t" * 64)
        self.secret.chmod(0o600)
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def start(self, name: str, port: int = 0) -> None:
        self.procs[name], self.ports[name], _ = node_process(
            self.tmp / name, self.secret, "--address", "127.0.0.1", name=name,
            cluster=CLUSTER, port=port)

    def stop(self) -> None:
        for p in self.procs.values():
            stop_process(p)


class Said(logging.Handler):
    """Log records of the cluster engine, with an event per awaited phrase."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.events: dict[str, threading.Event] = {}

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        for phrase, ev in list(self.events.items()):
            if phrase in line:
                ev.set()

    def wait_for(self, phrase: str, timeout: float) -> str:
        ev = self.events.setdefault(phrase, threading.Event())
        if not any(phrase in line for line in self.lines):
            assert ev.wait(timeout), f"no log line with {phrase!r} within {timeout} s: {self.lines}"
        return next(line for line in self.lines if phrase in line)


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    from mlx_lm.utils import load_tokenizer

    tmp = tmp_path_factory.mktemp("trial")
    model = tiny_model(tmp / "tiny", layers=4)
    spm_tokenizer(model)
    out = make_shards(model, tmp / "out", [2, 2])
    expected = reference_tokens(model, list(PROMPT), MAX_TOKENS)
    assert EOS not in expected, "the prompt must run to MAX_TOKENS: pick another"
    text = load_tokenizer(model).decode(expected)  # the tokenizer's own decode, not streaming
    assert "t" in text and " " in text
    nodes = Nodes(tmp)
    try:
        nodes.start("nodeA")
        nodes.start("nodeB")
        yield nodes, out, expected, text
    finally:
        nodes.stop()


def stream(engine, on_token=None) -> tuple[list[int], str, list[float]]:
    """Tokens, text and arrival time of each token of one greedy request."""
    from mlxdist.runtime.api import GenerationRequest

    tokens, text, times = [], [], []
    for ev in engine.submit(GenerationRequest(PROMPT, MAX_TOKENS)):
        text.append(ev.text)
        if ev.token is not None:
            tokens.append(ev.token)
            times.append(time.time())
            if on_token:
                on_token(len(tokens))
        assert ev.error is None, ev.error
    return tokens, "".join(text), times


def first_difference(a: str, b: str) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at char {i}: {a[max(0, i - 20):i + 20]!r} != {b[max(0, i - 20):i + 20]!r}"


def test_node_killed_mid_stream_named_text_continues_and_moves_back(trial):
    from mlxdist.cluster.coordinator import open_cluster_engine
    from mlxdist.runtime.config import EngineConfig

    nodes, out, expected, text = trial
    said = Said()
    logger = logging.getLogger("mlxdist.cluster.engine")
    level = logger.level
    logger.addHandler(said)
    logger.setLevel(logging.INFO)
    pa, pb = nodes.ports["nodeA"], nodes.ports["nodeB"]
    engine = open_cluster_engine(out, f"127.0.0.1:{pa},127.0.0.1:{pb}", CLUSTER, nodes.secret,
                                 config=EngineConfig(startup_timeout_s=120))
    try:
        assert [v.name for v in engine.placement] == ["nodeA", "nodeB"]
        tokens, plain, _ = stream(engine)
        assert tokens == expected and plain == text  # uninterrupted: the reference text

        def kill_b(count: int) -> None:
            if count == 8:
                nodes.procs["nodeB"].send_signal(signal.SIGTERM)

        tokens, seamed, times = stream(engine, kill_b)
        [rec] = engine.recoveries
        rec_split = engine.split
        assert rec["fatal"] is None and rec["lost"] == ["nodeB"], rec
        assert times[-1] > rec["noticed_at"], "the loss was not mid-stream"  # a real seam
        assert tokens == expected
        assert seamed == text, first_difference(seamed, text)
        line = said.wait_for(" lost", timeout=5)
        assert line.startswith(f"nodeB (127.0.0.1:{pb}) lost; stage 1 moved from nodeB to "
                               "nodeA; now on ['nodeA', 'nodeA']"), line
        # what GET /v1/cluster shows: both stages on nodeA, nodeB lost, the events in order
        layout = engine.layout()
        assert [(st.rank, st.node, st.start, st.end) for st in layout.stages] == \
            [(0, "nodeA", 0, rec_split[0]), (1, "nodeA", rec_split[0], sum(rec_split))]
        assert {n.name: n.health for n in layout.nodes} == {"nodeA": "ok", "nodeB": "lost"}
        kinds = [e["event"] for e in engine.events()]
        assert kinds[:4] == ["placed", "node_lost", "requests_healed", "replaced"], kinds

        assert nodes.procs["nodeB"].wait(timeout=20) == 0
        nodes.start("nodeB", port=pb)  # B comes back on its port, with its data dir
        line = said.wait_for(" back", timeout=90)
        assert line.startswith(f"nodeB (127.0.0.1:{pb}) back; stage 1 moved from nodeA to "
                               "nodeB; now on ['nodeA', 'nodeB']"), line
        assert engine.recoveries[-1]["reason"] == "nodes back"
        assert engine.recoveries[-1]["back"] == ["nodeB"]
        assert [v.name for v in engine.placement] == ["nodeA", "nodeB"]
        assert [st.node for st in engine.layout().stages] == ["nodeA", "nodeB"]
        assert engine.events()[-1]["event"] == "nodes_back"
        assert stream(engine)[:2] == (expected, text)
    finally:
        engine.close()
        logger.removeHandler(said)
        logger.setLevel(level)
