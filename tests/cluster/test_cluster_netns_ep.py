"""An expert-parallel plan served across three network namespaces (tools/netns.py), each
running `mlxdist node`, found by mDNS only: a tiny DeepSeek checkpoint in the HF format
(8 routed experts), `mlxdist plan --strategy expert-parallel --json` for the three nodes,
`mlxdist quantize --plan` (one part per node, docs/shard-format.md), then `mlxdist serve
OUT --nodes auto --plan plan.json` asked through the official openai client. The
reference is single-process mlx-lm on the same model converted whole. Each node is sent
only its own part (part i held as stage i of the model), and `mlxdist cluster` reports
the bytes it holds. A node lost mid-generation: its part goes whole to a survivor with
room and the request finishes with mlx-lm's tokens.

Then a mixed plan on the same nodes (`mlxdist plan --strategy mixed`: n0 a pipeline stage,
n1 and n2 one expert-parallel stage), converted with `quantize --plan` and served the same
way: mlx-lm's tokens, n0 holding its stage alone and each member its part alone (bytes
from `mlxdist cluster`, safetensors headers read here, the workers' own lines); the
relaying member lost mid-generation: its rank and part move to n0 and the request
finishes with mlx-lm's tokens."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlxdist.shard_format import Manifest
from tests.conftest import needs_root

from cluster_fixtures import stop_process
from test_cluster_netns import CLUSTER, DRIVER, ROOT, Cluster, Events, netns, three_nodes, wait_serving

pytestmark = [needs_root, pytest.mark.root, pytest.mark.skipif(
    netns.available() is not None, reason=f"network namespaces: {netns.available()}")]
PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 119]


def mlxdist(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "mlxdist", *args], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


class EPCluster(Cluster):
    """The three namespaces' nodes and an expert-parallel conversion planned for them."""

    def __init__(self, net: netns.TestNet, tmp: Path) -> None:
        import make_checkpoint  # tools/, on the path since test_cluster_netns

        self.net, self.tmp, self.procs = net, tmp, {}
        self.secret_file = tmp / "secret"
        self.secret_file.write_text("e" * 64)
        self.secret_file.chmod(0o600)
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), MLXDIST_CLUSTER=CLUSTER,
                        MLXDIST_SECRET_FILE=str(self.secret_file), MLXDIST_MDNS_ADDRESSES=net.hosts[0].ip)
        ckpt = self.ckpt = make_checkpoint.deepseek(tmp / "ckpt")
        config = json.loads((ckpt / "config.json").read_text())
        # float32 floats: the CPU backend then runs exactly what mlx-lm runs
        (ckpt / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
        # three equal nodes on a fast link, many requests: EP over all three is the fastest
        (tmp / "nodes.json").write_text(json.dumps({"link": "tb5-rdma", "nodes": [
            {"name": f"n{i}", "memory_gb": 16, "reserve_gb": 0, "bandwidth_gbs": 1, "tflops": 0.01}
            for i in range(3)]}))
        self.plan_file = tmp / "plan.json"
        self.plan_file.write_text(mlxdist("plan", str(ckpt), "--nodes", str(tmp / "nodes.json"), "--strategy",
                                          "expert-parallel", "--context", "128", "--concurrency", "8", "--json"))
        self.plan = json.loads(self.plan_file.read_text())
        self.out = tmp / "moe"
        mlxdist("quantize", str(ckpt), str(self.out), "--plan", str(self.plan_file), "--quiet")
        whole = tmp / "whole"
        mlxdist("quantize", str(ckpt), str(whole), "--stages", "1", "--quiet")
        self.max_tokens = 12
        self.long = reference(whole, PROMPT, 120)  # greedy: its first tokens are a shorter run's
        self.expected = self.long[:self.max_tokens]
        self.tokenizer_dir = whole


def reference(out: Path, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of single-process mlx-lm on the unsliced conversion."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(out)
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                             sampler=lambda lp: mx.argmax(lp, axis=-1))]


@pytest.fixture(scope="module")
def ep(tmp_path_factory):
    # until all three answer
    yield from three_nodes(EPCluster, tmp_path_factory.mktemp("nsep"),
                           lambda views: all(v["health"] == "ok" for v in views))


def test_the_plan_is_expert_parallel_over_the_three_nodes(ep):
    [stage] = ep.plan["stages"]
    assert ep.plan["group"] == stage["nodes"] == ["n0", "n1", "n2"]
    assert sorted(e for ids in stage["experts"].values() for e in ids) == list(range(8))


def test_plan_nodes_auto_places_the_experts_over_the_discovered_nodes(ep):
    """`mlxdist plan --nodes auto --strategy expert-parallel`, run in a namespace: the
    planner weighs the three live nodes that mDNS and the control plane found (their probed
    memory and chips, not a nodes.json), places the experts on those it picks, and every
    routed expert goes to exactly one of them."""
    argv = [sys.executable, "-m", "mlxdist", "plan", str(ep.ckpt), "--nodes", "auto", "--strategy",
            "expert-parallel", "--context", "128", "--concurrency", "8", "--json"]
    for _ in range(5):  # a loaded machine's mDNS may answer after plan's browse: ask again
        r = ep.net.run(0, argv, env=ep.env, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        plan = json.loads(r.stdout)
        if "over 3 nodes" in plan["reason"]:  # all three were found
            break
    [stage] = plan["stages"]
    # the cost model may use fewer than all (for this tiny model on CPU nodes it picks two of
    # the three: fewer hops); it must have weighed all three
    assert "over 3 nodes" in plan["reason"], plan["reason"]
    assert plan["group"] == stage["nodes"] and set(stage["nodes"]) <= {"n0", "n1", "n2"}
    assert len(stage["nodes"]) >= 2, plan
    experts = stage["experts"]
    owned = sorted(e for node in stage["nodes"] for e in experts[node])
    assert owned == list(range(8))  # make_checkpoint.deepseek: 8 routed experts, each on one node
    assert all(experts[node] for node in stage["nodes"])
    # the user sees every node that was found, those the plan leaves out included
    assert "found 3 node(s) on the cluster: " in r.stderr
    assert all(f"{n} (" in r.stderr for n in ("n0", "n1", "n2")), r.stderr


def serve_and_ask(ep, out: Path, plan_file: Path, port: int, model: str) -> tuple[str, int, dict, list[dict]]:
    """`mlxdist serve OUT --nodes auto --plan PLAN` from n0, one greedy completion through
    the official openai client, then `/v1/cluster` and `mlxdist cluster --json`'s nodes;
    the server is stopped after. Returns (text, completion tokens, cluster view, nodes)."""
    serve = ep.net.popen(0, [sys.executable, "-m", "mlxdist", "serve", str(out), "--nodes", "auto",
                             "--plan", str(plan_file), "--port", str(port), "--quiet"], env=ep.env,
                         cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(serve, 120)
        code = ("import json; from openai import OpenAI; "
                f"c = OpenAI(base_url='http://127.0.0.1:{port}/v1', api_key='x'); "
                f"r = c.completions.create(model='{model}', prompt={PROMPT}, max_tokens={ep.max_tokens}, "
                "temperature=0); "
                f"import urllib.request; v = json.load(urllib.request.urlopen('http://127.0.0.1:{port}/v1/cluster')); "
                "print(json.dumps([r.choices[0].text, r.usage.completion_tokens, v]))")
        r = ep.net.run(0, [sys.executable, "-c", code], env=ep.env, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        text, count, view = json.loads(r.stdout)
        r = ep.net.run(0, [sys.executable, "-m", "mlxdist", "cluster", "--cluster", CLUSTER, "--secret-file",
                           str(ep.secret_file), "--address", ep.net.hosts[0].ip, "--browse", "3", "--json"],
                       env=ep.env, timeout=60)
        assert r.returncode == 0, r.stderr
        return text, count, view, json.loads(r.stdout)["nodes"]
    finally:
        stop_process(serve)


def expected_text(ep) -> str:
    """mlx-lm's greedy tokens as the server writes text (ids it has no bytes for show as
    "!", which `decode` drops)."""
    from mlx_lm.utils import load_tokenizer

    detok = load_tokenizer(ep.tokenizer_dir).detokenizer
    detok.reset()
    for t in ep.expected:
        detok.add_token(t)
    detok.finalize()
    return detok.text


def serve_through_a_loss(ep, out: Path, plan_file: Path, lose: int) -> tuple[dict, dict, float]:
    """The driver serves one long greedy request; once it has progressed, everything in
    node n<lose>'s namespace is killed. Returns the request's result, its one recovery and
    when the kill was."""
    p = ep.net.popen(0, [sys.executable, DRIVER, "serve", json.dumps({
        "cluster": CLUSTER, "secret_file": str(ep.secret_file), "address": ep.net.hosts[0].ip,
        "out": str(out), "plan": str(plan_file), "prompt": PROMPT, "max_tokens": len(ep.long),
        "progress_at": 4})], env=ep.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    events = Events(p)
    try:
        first = events.until(lambda ev: any("progress" in e for e in ev), 120)
        assert first and first[0]["placement"] == ["n0", "n1", "n2"], first
        t_kill = time.time()
        netns.kill_processes(ep.net.hosts[lose].ns)
        [result] = events.until(lambda ev: len(ev) >= 1, 120)
        assert result["error"] is None and result["tokens"] == ep.long, json.dumps(result)[-3000:]
        [rec] = result["recoveries"]
        assert p.wait(timeout=60) == 0
        return result, rec, t_kill
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=5)


def test_served_over_openai_each_node_holding_only_its_experts(ep):
    """`mlxdist serve OUT --nodes auto --plan plan.json`: the greedy completion is the text
    of mlx-lm's tokens (the server's detokenizer's); each node's store holds its part alone (its experts' rows only),
    byte-equal to the conversion's; `mlxdist cluster` reports the bytes each holds."""
    from mlxdist.shard_format import read_safetensors_header

    text, count, view, nodes = serve_and_ask(ep, ep.out, ep.plan_file, 8097, "moe")
    experts = ep.plan["stages"][0]["experts"]  # layout() and events() over the nodes
    assert [(st["node"], st["experts"]["owned"]) for st in view["stages"]] == [
        (node, experts[node]) for node in ep.plan["group"]], view["stages"]
    assert view["events"][0]["event"] == "placed" and "n0, n1, n2" in view["events"][0]["message"]
    assert count == ep.max_tokens and text == expected_text(ep), (text, ep.expected)
    held = {n["name"]: (n["shards"], n["held_bytes"], n["role"]) for n in nodes}
    (stage,) = Manifest.load(ep.out).stages
    for rank, part in enumerate(stage.parts):
        i = int(part.node[1:])
        src = ep.out / part.dir
        sent = sorted(src.iterdir()) + [ep.out / "manifest.json"]
        assert held[part.node] == ([f"moe/{rank}"], sum(f.stat().st_size for f in sent), f"rank {rank}"), held
        store = ep.data_dir(i) / "shards"
        assert [p.name for p in store.iterdir()] == ["moe"] and [p.name for p in (store / "moe").iterdir()] == [
            str(rank)]
        copy = store / "moe" / str(rank)
        assert sorted(p.name for p in copy.iterdir() if not p.name.startswith(".")) == sorted(f.name for f in sent)
        for f in sent:
            assert hashlib.sha256((copy / f.name).read_bytes()).digest() == hashlib.sha256(f.read_bytes()).digest()
        head = read_safetensors_header(copy / "weights.safetensors")
        routed = {name: t.shape for name, t in head.items() if ".switch_mlp." in name}
        assert routed and all(shape[0] == len(part.experts) for shape in routed.values()), routed
        assert json.loads((copy / "stage.json").read_text())["experts"] == list(part.experts)
        print(f"\n{part.node}: experts {list(part.experts)}, {held[part.node][1]} bytes held")


def test_node_lost_its_part_moves_and_the_request_finishes(ep):
    """Everything in n2's namespace dies mid-generation: its part goes whole to a survivor
    with room (sent it, sha256-equal to the conversion's), the group is n0, n1, and the
    request, re-prefilled there, finishes with exactly mlx-lm's greedy tokens."""
    result, rec, t_kill = serve_through_a_loss(ep, ep.out, ep.plan_file, 2)
    assert rec["lost"] == ["n2"] and rec["fatal"] is None and rec["group"] == ["n0", "n1"], rec
    assert result["placement"] == ["n0", "n1"]
    (stage,) = Manifest.load(ep.out).stages
    lost = stage.parts[2]
    assert lost.node == "n2"
    adopted = [i for i in range(2) if (ep.data_dir(i) / "shards" / "moe" / "2").is_dir()]
    assert len(adopted) == 1, adopted
    copy = ep.data_dir(adopted[0]) / "shards" / "moe" / "2"
    assert json.loads((copy / "stage.json").read_text())["node"] == "n2"
    for f in sorted((ep.out / lost.dir).iterdir()):
        assert (copy / f.name).read_bytes() == f.read_bytes(), f.name
    print(f"\nn2 lost: its part re-placed on n{adopted[0]} in {rec['seconds']:.1f} s "
          f"(noticed {rec['noticed_at'] - t_kill:.1f} s after the kill); {len(result['tokens'])} tokens exact")


# -- a mixed plan: rank 0's pipeline stage on n0, one expert-parallel stage over n1 and n2 ------


def safetensors_table(path: Path) -> dict[str, dict]:
    """A safetensors file's tensor table, read here from the format itself (8-byte
    little-endian header length, then JSON): name -> {dtype, shape, data_offsets}."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        table = json.loads(f.read(n))
    table.pop("__metadata__", None)
    return table


def routed_bytes_in(path: Path, layers: range) -> int:
    """Bytes of the routed experts' tensors of `layers` in a safetensors file."""
    return sum(t["data_offsets"][1] - t["data_offsets"][0] for name, t in safetensors_table(path).items()
               if ".switch_mlp." in name and int(name.split(".")[2]) in layers)


class Mixed:
    """The mixed plan for the three nodes (`mlxdist plan --strategy mixed`) and the
    conversion it cut (`mlxdist quantize --plan`: stages/0, stages/1/nodes/{n1,n2})."""

    def __init__(self, ep: EPCluster) -> None:
        self.plan_file = ep.tmp / "mixed.json"
        self.plan_file.write_text(mlxdist("plan", str(ep.ckpt), "--nodes", str(ep.tmp / "nodes.json"), "--strategy",
                                          "mixed", "--context", "128", "--concurrency", "8", "--json"))
        self.plan = json.loads(self.plan_file.read_text())
        self.out = ep.tmp / "mixed"
        mlxdist("quantize", str(ep.ckpt), str(self.out), "--plan", str(self.plan_file), "--quiet")


@pytest.fixture(scope="module")
def mixed(ep):
    """The mixed conversion, with all three nodes answering (a test before may have
    killed n2: it is started again, with its data dir, and waited for)."""
    for i, p in ep.procs.items():
        if p.poll() is not None:
            ep.start_node(i)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        views = ep.driver("discover", expect=3, browse=3)[0]
        if sorted(v["name"] for v in views if v["health"] == "ok") == ["n0", "n1", "n2"]:
            break
    else:
        pytest.fail(f"the three nodes do not answer: {views}")
    return Mixed(ep)


def test_mixed_plan_served_over_openai_each_member_holding_only_its_experts(ep, mixed):
    """`mlxdist serve OUT --nodes auto --plan mixed.json`: n0 runs layers [0, k) as rank 0,
    n1 and n2 the expert-parallel stage over [k, 5) as ranks 1 and 2. The greedy completion
    is the text of mlx-lm's tokens on the unsliced conversion. n0 is sent its stage alone,
    each member its part alone: `mlxdist cluster --json` reports per node exactly those
    bytes, each held copy's routed tensors have its experts' rows only (its routed bytes the
    whole stage's times its share, from the unsliced conversion's safetensors header), and
    each member's worker says it holds those routed bytes."""
    first, stage = mixed.plan["stages"]
    assert mixed.plan["group"] == ["n0", "n1", "n2"] and first["nodes"] == ["n0"] and stage["nodes"] == ["n1", "n2"]
    text, count, view, nodes = serve_and_ask(ep, mixed.out, mixed.plan_file, 8096, "mixed")
    assert [(st["node"], st["layers"], st["experts"] and st["experts"]["owned"]) for st in view["stages"]] == [
        ("n0", first["layers"], None), ("n1", stage["layers"], stage["experts"]["n1"]),
        ("n2", stage["layers"], stage["experts"]["n2"])], view["stages"]
    assert count == ep.max_tokens and text == expected_text(ep), (text, ep.expected)
    held = {n["name"]: {k: b for k, b in n["shard_bytes"].items() if k.startswith("mixed/")} for n in nodes}
    manifest = Manifest.load(mixed.out)
    a, b = stage["layers"]
    whole = routed_bytes_in(ep.tokenizer_dir / "stages" / "0" / "weights.safetensors", range(a, b))
    assert whole > 0
    sent = {"n0": (0, mixed.out / "stages" / "0")}
    sent.update({p.node: (1 + 2 * r, mixed.out / p.dir) for r, p in enumerate(manifest.stages[1].parts)})
    for node, (key, src) in sent.items():
        files = sorted(f for f in src.iterdir() if f.is_file()) + [mixed.out / "manifest.json"]
        assert held[node] == {f"mixed/{key}": sum(f.stat().st_size for f in files)}, held
        copy = ep.data_dir(int(node[1:])) / "shards" / "mixed" / str(key)
        for f in files:
            assert hashlib.sha256((copy / f.name).read_bytes()).digest() == hashlib.sha256(f.read_bytes()).digest()
        if node == "n0":
            assert routed_bytes_in(copy / "weights.safetensors", range(a, b)) == 0
            continue
        experts = stage["experts"][node]
        table = safetensors_table(copy / "weights.safetensors")
        routed = [t["shape"][0] for name, t in table.items() if ".switch_mlp." in name]
        assert routed and set(routed) == {len(experts)}, routed
        mine = routed_bytes_in(copy / "weights.safetensors", range(a, b))
        assert mine == whole * len(experts) // 8, (mine, whole)
        logs = [p.read_text() for p in (ep.data_dir(int(node[1:])) / "jobs").glob("*/rank*/worker.log")]
        said = [m for log in logs for m in re.findall(r"experts (\[[\d, ]+\]), routed rows per MoE layer "
                                                      r"\[[\d, ]+\], routed bytes (\d+)", log)]
        assert said == [(str(experts), str(mine))], said
        print(f"\n{node}: experts {experts}, {held[node]} held, routed bytes {mine} of the stage's {whole}")


def test_mixed_plan_member_lost_its_rank_moves_and_the_request_finishes(ep, mixed):
    """Everything in n1's namespace (the stage's relaying member) dies mid-generation: its
    rank, with its part, goes whole to n0 (n2 runs the stage's other member), the group
    becomes n0, n0, n2, n0 is sent n1's part (sha256-equal to the conversion's), and the
    request, re-prefilled there, finishes with exactly mlx-lm's greedy tokens."""
    result, rec, t_kill = serve_through_a_loss(ep, mixed.out, mixed.plan_file, 1)
    assert rec["lost"] == ["n1"] and rec["fatal"] is None and rec["group"] == ["n0", "n0", "n2"], rec
    assert result["placement"] == ["n0", "n0", "n2"]
    part = Manifest.load(mixed.out).stages[1].parts[0]
    assert part.node == "n1"
    copy = ep.data_dir(0) / "shards" / "mixed" / "1"
    assert json.loads((copy / "stage.json").read_text())["node"] == "n1"
    for f in sorted((mixed.out / part.dir).iterdir()):
        assert (copy / f.name).read_bytes() == f.read_bytes(), f.name
    print(f"\nn1 lost: its rank re-placed on n0 in {rec['seconds']:.1f} s (noticed {rec['noticed_at'] - t_kill:.1f} s "
          f"after the kill); {len(result['tokens'])} tokens exact")
