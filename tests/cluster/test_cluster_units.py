"""Pure pieces: the mDNS TXT record, stage placement after node loss, the secret file."""

from __future__ import annotations

import pytest

from mlxdist.cluster.coordinator import NodeView
from mlxdist.cluster.discovery import decode_txt, encode_txt
from mlxdist.cluster.engine import PlacementError, place_stages
from mlxdist.cluster.secret import load_secret
from mlxdist.errors import UserError

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


def view(name: str, free_gib: float) -> NodeView:
    return NodeView(name, name, "10.0.0.1", 1, "ok", memory_available=int(free_gib * GiB))


def test_place_stages_first_and_after_loss():
    a, b, c = view("a", 10), view("b", 10), view("c", 10)
    sizes = [4 * GiB, 4 * GiB, 4 * GiB]
    assert [v.name for v in place_stages([a, b, c], sizes)] == ["a", "b", "c"]
    current = {0: "a", 1: "b", 2: "c"}
    after = place_stages([a, b], sizes, current)  # c lost: its stage moves, others stay
    assert [v.name for v in after[:2]] == ["a", "b"] and after[2].name in ("a", "b")
    small = [view("a", 5), view("b", 6)]
    with pytest.raises(PlacementError, match=r"stage 2 needs 4.00 GiB; b has 2.00 GiB free"):
        place_stages(small, sizes, current)
    with pytest.raises(PlacementError, match="no node is left"):
        place_stages([], sizes, current)


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
