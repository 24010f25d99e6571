"""Shard delivery: complete, skipped when held, resumed after a broken link, refused when
corrupt, copied from a shared path. Checked against hashlib and the source bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from mlxdist.cluster.client import NodeClient, RemoteError
from mlxdist.cluster.shards import stage_files

from cluster_fixtures import CLUSTER, SECRET, make_stage, node  # noqa: F401 (node: fixture)



def same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    if names != sorted(p.name for p in b.iterdir() if not p.name.startswith(".")):
        return False
    return all(hashlib.sha256((a / n).read_bytes()).digest()
               == hashlib.sha256((b / n).read_bytes()).digest() for n in names)


def test_file_digests_match_hashlib(tmp_path):
    d = make_stage(tmp_path)
    files = stage_files(d)
    for name, digest in files.items():
        assert digest.sha256 == hashlib.sha256((d / name).read_bytes()).hexdigest()
        assert digest.size == (d / name).stat().st_size


def test_deliver_then_skip(node, tmp_path):
    src = make_stage(tmp_path / "out")
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as c:
        first = c.deliver_stage(src, "tiny", 0)
        total = sum(p.stat().st_size for p in src.iterdir())
        assert not first.skipped and first.bytes_sent == total
        held = node.store.stage_dir("tiny", 0)
        assert held is not None and same_tree(src, held)
        again = c.deliver_stage(src, "tiny", 0)
        assert again.skipped and again.bytes_sent == 0
        inv = c.status()["shards"]
        assert [(s["model"], s["stage"]) for s in inv] == [("tiny", 0)]


class Cut(Exception):
    pass


def test_resume_after_broken_link(node, tmp_path):
    src = make_stage(tmp_path / "out")
    total = sum(p.stat().st_size for p in src.iterdir())
    got = []

    def cut_after_two_chunks(n: int) -> None:
        got.append(n)
        if len(got) == 2:
            raise Cut()

    c = NodeClient("127.0.0.1", node.port, SECRET, CLUSTER)
    with pytest.raises(Cut):
        c.deliver_stage(src, "tiny", 0, progress=cut_after_two_chunks)
    c.close()  # the link breaks mid-file
    assert node.store.stage_dir("tiny", 0) is None  # nothing half-written looks complete
    assert node.store.inventory() == []
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as c2:
        d = c2.deliver_stage(src, "tiny", 0)
    assert d.bytes_sent == total - sum(got)  # only what was missing
    assert same_tree(src, node.store.stage_dir("tiny", 0))


def test_changed_source_is_redelivered(node, tmp_path):
    src = make_stage(tmp_path / "out")
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as c:
        c.deliver_stage(src, "tiny", 0)
        (src / "config.json").write_text('{"model_type": "llama", "changed": true}')
        d = c.deliver_stage(src, "tiny", 0)
        assert not d.skipped
    assert same_tree(src, node.store.stage_dir("tiny", 0))


def test_corrupt_bytes_fail_the_checksum(node, tmp_path):
    src = make_stage(tmp_path / "out", weights_bytes=1000)
    files = {n: {"size": f.size, "sha256": f.sha256} for n, f in stage_files(src).items()}
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as c:
        c.request({"t": "shard_state", "model": "tiny", "stage": 0, "files": files})
        for name in files:
            data = (src / name).read_bytes()
            if name == "weights.safetensors":
                data = bytes([data[0] ^ 1]) + data[1:]
            c.request({"t": "shard_chunk", "model": "tiny", "stage": 0, "file": name,
                       "offset": 0, "data": data})
        with pytest.raises(RemoteError, match="sha256"):
            c.request({"t": "shard_commit", "model": "tiny", "stage": 0})
        assert node.store.stage_dir("tiny", 0) is None
        d = c.deliver_stage(src, "tiny", 0)  # resends only the corrupt file
        assert d.bytes_sent == 1000
    assert same_tree(src, node.store.stage_dir("tiny", 0))


@pytest.mark.parametrize("msg,match", [
    ({"model": "../etc", "stage": 0}, "bad model"),
    ({"model": "tiny", "stage": -1}, "bad stage"),
    ({"model": "tiny", "stage": 0, "files": {"../x": {"size": 1, "sha256": "0" * 64}}},
     "bad file name"),
    ({"model": "tiny", "stage": 0, "files": {".hidden": {"size": 1, "sha256": "0" * 64}}},
     "bad file name"),
])
def test_bad_names_refused(node, msg, match):
    msg = {"t": "shard_state", "files": {"a": {"size": 1, "sha256": "0" * 64}}, **msg}
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as c:
        with pytest.raises(RemoteError, match=match):
            c.request(msg)


def test_chunk_with_wrong_offset_refused(node, tmp_path):
    src = make_stage(tmp_path / "out", weights_bytes=100)
    files = {n: {"size": f.size, "sha256": f.sha256} for n, f in stage_files(src).items()}
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as c:
        c.request({"t": "shard_state", "model": "tiny", "stage": 0, "files": files})
        with pytest.raises(RemoteError, match="offset"):
            c.request({"t": "shard_chunk", "model": "tiny", "stage": 0,
                       "file": "weights.safetensors", "offset": 50, "data": b"x"})
        with pytest.raises(RemoteError, match="past the end"):
            c.request({"t": "shard_chunk", "model": "tiny", "stage": 0,
                       "file": "weights.safetensors", "offset": 0, "data": b"x" * 101})


def test_shared_path(node, tmp_path):
    """The node copies from a directory in its data dir that it can read itself (as from
    an NFS/SMB mount there), given absolute or relative to the data dir."""
    src = make_stage(node.config.data_dir / "shared" / "model")
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as c:
        d = c.deliver_stage(src, "tiny", 0, shared_path=str(src))
        assert not d.skipped and d.bytes_sent == 0
        assert same_tree(src, node.store.stage_dir("tiny", 0))
        assert c.deliver_stage(src, "tiny", 0, shared_path=str(src)).skipped
        d = c.deliver_stage(src, "tiny", 1, shared_path="shared/model/stages/0")
        assert same_tree(src, node.store.stage_dir("tiny", 1))
        with pytest.raises(RemoteError, match="not a directory"):
            c.deliver_stage(src, "tiny", 2, shared_path=str(node.config.data_dir / "missing"))


def outside_paths(node, tmp_path) -> tuple[Path, list[str]]:
    """A stage directory outside the node's data dir, and paths that reach it: absolute,
    `..` (relative and absolute), a symlinked directory inside the data dir, and a real
    directory inside whose weights file is a symlink out."""
    data = node.config.data_dir
    outside = make_stage(tmp_path / "outside")
    (data / "shared").mkdir(parents=True, exist_ok=True)
    (data / "shared" / "link").symlink_to(outside, target_is_directory=True)
    inside = data / "shared" / "mixed"
    inside.mkdir()
    for f in outside.iterdir():
        if f.name == "weights.safetensors":
            (inside / f.name).symlink_to(f)
        else:
            (inside / f.name).write_bytes(f.read_bytes())
    rel = os.path.relpath(outside, data)
    return outside, [str(outside), rel, str(data / rel), str(data / "shared" / "link"),
                     "shared/link", str(inside)]


def test_shard_pull_is_confined_to_the_data_dir(node, tmp_path):
    """A peer cannot make the node read a file outside its data dir, not even as a sha256
    oracle: the right digests of files outside are refused as the wrong ones are, before
    anything is read, with a one-line reason."""
    outside, paths = outside_paths(node, tmp_path)
    files = {n: {"size": f.size, "sha256": f.sha256} for n, f in stage_files(outside).items()}
    wrong = {n: {"size": f["size"], "sha256": "0" * 64} for n, f in files.items()}
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as c:
        for path in paths:
            for digests in (files, wrong):
                with pytest.raises(RemoteError) as e:
                    c.request({"t": "shard_pull", "model": "tiny", "stage": 0, "path": path,
                               "files": digests})
                assert "outside this node's data dir" in str(e.value), (path, str(e.value))
                assert "\n" not in str(e.value)
        assert c.status()["shards"] == []
    secret_bytes = (outside / "weights.safetensors").read_bytes()
    for f in node.config.data_dir.rglob("*"):
        if f.is_file() and not f.is_symlink():
            assert secret_bytes[:4096] not in f.read_bytes(), f
