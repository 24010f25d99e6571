"""Pure pieces: the mDNS TXT record, the planner's stage placement on node views (first and
after a node loss) and the links it prices, the secret file."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mlxdist.cluster.discovery import decode_txt, encode_txt
from mlxdist.cluster.interfaces import Interface
from mlxdist.cluster.inventory import Conversion, cluster_spec
from mlxdist.cluster.nodes import NodeView
from mlxdist.cluster.secret import load_secret
from mlxdist.errors import UserError
from mlxdist.placement.specs import LINK_PRESETS
from mlxdist.placement.model import LayerSpec, ModelSpec, Quant

GiB = 1 << 30


def advert(shards: int = 0, interfaces: int = 2) -> dict:
    return {"node_id": "abcdef0123456789", "name": "mac-studio-" + "x" * 80, "version": "0.1.0",
            "protocol": 1, "cluster": "home", "chip": "Apple M2 Ultra " + "y" * 100,
            "memory_total": 192 * GiB, "memory_available": 150 * GiB, "gpu_cores": 76,
            "bandwidth_gbs": 612.5,
            "interfaces": [{"name": f"en{i}", "addresses": [f"10.0.{i}.1/30"],
                            "thunderbolt": i > 0} for i in range(interfaces)],
            "shards": [{"model": "deepseek-r1-4bit", "stage": k, "digest": f"{k:064x}",
                        "bytes": 1} for k in range(shards)]}


def test_txt_roundtrip_within_limits():
    txt = encode_txt(advert(shards=40, interfaces=12))
    assert all(len(k) + 1 + len(v.encode()) <= 255 for k, v in txt.items())
    assert sum(len(k) + 2 + len(v.encode()) for k, v in txt.items()) < 1300  # one packet
    peer = decode_txt(txt, ["192.168.1.5"], 52415)
    assert peer.node_id == "abcdef0123456789" and peer.port == 52415
    assert (peer.memory_total, peer.gpu_cores, peer.bandwidth_gbs) == (192 * GiB, 76, 612.5)
    assert peer.shard_count == 40 and 0 < len(peer.shards) < 40  # truncated, whole entries
    assert peer.shards[0] == "deepseek-r1-4bit/0@00000000"
    assert len(peer.interfaces) == 8
    assert [i.thunderbolt for i in peer.interfaces[:2]] == [False, True]
    assert peer.interfaces[1].addresses == ("10.0.1.1/30",)


def test_txt_garbage_does_not_crash():
    assert decode_txt({}, [], 0) is None
    peer = decode_txt({"id": "x", "mem": "lots", "bw": "fast", "if0": "a|b", "sh": ",,"}, [], 1)
    assert peer.memory_total == 0 and peer.bandwidth_gbs == 0.0 and peer.interfaces == ()
    assert peer.shards == ()


def view(name: str, total_gib: float, host: str = "10.0.0.1", thunderbolt: bool = False) -> NodeView:
    return NodeView(name, name, host, 1, "ok", memory_total=int(total_gib * GiB),
                    interfaces=(Interface("en1", (f"{host}/24",), thunderbolt),))


def conversion(stages: int = 3, stage_gib: float = 4) -> Conversion:
    """Three 4 GiB stages of a 3-layer model without a KV cache."""
    layers = tuple(LayerSpec(i, 1 << 20, 0, 0, 0, 0, 0, 0, 0, 1) for i in range(stages))
    model = ModelSpec("m", "llama", 64, 10, Quant(), layers, 0, 0, False)
    return Conversion(model, tuple((i, i + 1) for i in range(stages)), (int(stage_gib * GiB),) * stages, 4096)


def test_stages_placed_first_and_after_loss():
    # a 20 GiB node: 8 GB reserved, 95% of the rest is 11.9 GiB: room for two 4 GiB stages
    conv = conversion()
    a, b, c = view("a", 20), view("b", 20), view("c", 20)
    req = conv.request(4)
    assert conv.plan_on([a, b, c], req).group == ("a", "b", "c")
    after = conv.plan_on([a, b], req, keep={0: "a", 1: "b", 2: "c"})  # c lost: its stage moves
    assert after.group[:2] == ("a", "b") and after.group[2] in ("a", "b")
    small = [view("a", 10), view("b", 10.5)]  # 95% of (10 GiB - 8 GB) = 2.42 GiB, and 2.90
    with pytest.raises(UserError, match=r"its 3 stages need 12.00 GiB .* but the nodes offer 5.32 GiB "
                                        r"\(a 2.42, b 2.90\): 6.68 GiB missing"):
        conv.plan_on(small, req, keep={0: "a", 1: "b", 2: "c"})
    with pytest.raises(UserError, match="no nodes to place the model on"):
        conv.plan_on([], req, keep={0: "a", 1: "b", 2: "c"})


def test_links_priced_from_interfaces():
    tb = [view("a", 20, "10.0.0.1", True), view("b", 20, "10.0.0.2", True)]
    cl = cluster_spec(tb)
    assert cl.default_link == "tb-tcp"
    assert (cl.link("a", "b").bandwidth, cl.link("a", "b").latency_s) == LINK_PRESETS["tb-tcp"]
    mixed = cluster_spec([view("a", 20, "127.0.0.1"), view("b", 20, "10.0.0.2"), view("c", 20, "10.0.0.3")])
    assert (mixed.link("a", "b").bandwidth, mixed.link("a", "b").latency_s) == LINK_PRESETS["loopback"]
    assert (mixed.link("b", "c").bandwidth, mixed.link("b", "c").latency_s) == LINK_PRESETS["ethernet-10g"]
    assert mixed.default_link == "ethernet-10g"


def test_identical_machines_get_one_speed():
    # two machines of one kind measured 10 and 12 GB/s: noise, both priced at 10; the
    # larger one is another kind and keeps its own
    same = [replace(view("a", 20), chip="Linux box", bandwidth_gbs=12.0),
            replace(view("b", 20), chip="Linux box", bandwidth_gbs=10.0),
            replace(view("c", 40), chip="Linux box", bandwidth_gbs=11.0)]
    assert [n.bandwidth for n in cluster_spec(same).nodes] == [10e9, 10e9, 11e9]


def test_secret_created_once_with_0600(tmp_path):
    path = tmp_path / "cfg" / "secret"
    s1, created = load_secret(path)
    assert created and len(s1) == 64 and (path.stat().st_mode & 0o777) == 0o600
    s2, created2 = load_secret(path)
    assert s2 == s1 and not created2
    with pytest.raises(UserError, match="no cluster secret"):
        load_secret(tmp_path / "other", create=False)
    short = tmp_path / "short"
    short.write_text("abc")
    short.chmod(0o600)
    with pytest.raises(UserError, match="too short"):
        load_secret(short)


def test_expert_parallel_loss_names_the_lost_nodes_experts_in_one_line():
    from mlxdist.cluster.engine import expert_ids, experts_lost
    from mlxdist.placement.plan import Stage

    assert expert_ids([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and expert_ids([4]) == "4"
    stage = Stage((0, 4), ("a", "b", "c"), (("a", (0, 1, 2)), ("b", (3, 4, 5)), ("c", (6, 7))))
    v = lambda name: NodeView(name, name, "10.0.0.3", 52415, "ok")  # noqa: E731
    msg = experts_lost(stage, [v("c")], [v("a"), v("b")], "rank 2 on c failed\ntraceback ...")
    assert msg == ("c (10.0.0.3:52415) lost, which held experts 6-7 of the expert-parallel stage; no other "
                   "node holds them, so requests cannot finish on the nodes left (a, b) "
                   "(first report: rank 2 on c failed)")
