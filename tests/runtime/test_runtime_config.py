"""EngineConfig, the one typed bag of engine options, and WorkerSpec, the blob a worker
reads on its stdin: both round-trip through msgpack and refuse what they do not know.
And the issue's measure of the design: a new engine option, from `mlxdist run` to the
workers, touches at most 4 files (its field, its use, its flag, its test)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import msgpack
import pytest
from runtime_helpers import ROOT, tiny_models  # noqa: F401 (fixture)

from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.launcher import WORKER_ARGV, WorkerSpec

SPEC = WorkerSpec(rank=1, ranks=3, hostfile="/tmp/h.json", model_dir="/m/stages/1", start=2, end=4,
                  num_layers=6, control="127.0.0.1:4000", session="ab" * 32, shard_root="/m",
                  experts=(4, 5), nccl="127.0.0.1:5000",
                  config=EngineConfig(max_concurrent=3, prompt_cache=2, handoff="collective",
                                      experts=((0, 1), (2, 3), (4, 5)), restart=False, model_name="tiny"))


def test_engine_config_round_trips_through_msgpack():
    for config in (EngineConfig(), SPEC.config, EngineConfig(heartbeat_timeout_s=2, experts=[[0], [1]])):
        assert EngineConfig.from_msgpack(config.to_msgpack()) == config
    assert EngineConfig(heartbeat_timeout_s=2).heartbeat_timeout_s == 2.0  # an int is a float here
    assert EngineConfig(experts=[[0], [1]]).experts == ((0,), (1,))  # lists become tuples (frozen)


@pytest.mark.parametrize("field,value", [
    ("max_concurrent", 0), ("max_concurrent", 1025), ("max_concurrent", "8"), ("max_concurrent", True),
    ("prefill_step", 2.5), ("prompt_cache", -1), ("backend", "ssh"), ("handoff", "--exec"),
    ("expert_parallel", 1), ("experts", [[0, "1"]]), ("experts", 3), ("heartbeat_timeout_s", 0),
    ("heartbeat_timeout_s", float("nan")), ("startup_timeout_s", "60"), ("restart", "yes"),
    ("restart_limit", -1), ("in_process", None), ("model_name", 5), ("model_name", "x" * 300),
])
def test_engine_config_refuses_ill_typed_fields_by_name(field, value):
    blob = msgpack.packb({**asdict(EngineConfig()), field: value})
    with pytest.raises(ValueError, match=f"EngineConfig.{field}"):
        EngineConfig.from_msgpack(blob)
    with pytest.raises(ValueError, match=f"EngineConfig.{field}"):
        EngineConfig(**{field: value})


def test_engine_config_refuses_unknown_fields_and_garbage():
    with pytest.raises(ValueError, match="unknown field 'launcher'"):
        EngineConfig.from_msgpack(msgpack.packb({"launcher": "x"}))
    for garbage in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({1: 2})):
        with pytest.raises(ValueError):
            EngineConfig.from_msgpack(garbage)


def test_worker_spec_blob_round_trips_and_is_checked():
    blob = SPEC.to_msgpack()
    assert WorkerSpec.from_msgpack(blob) == SPEC
    fields = msgpack.unpackb(blob)
    assert EngineConfig.from_msgpack(msgpack.packb(fields["config"])) == SPEC.config  # whole, inside
    for change, name in [({"rank": 3}, "rank"), ({"end": 7}, "start/end"), ({"session": 5}, "session"),
                         ({"experts": ["4"]}, "experts"), ({"surprise": 1}, "unknown field"),
                         ({"config": {**fields["config"], "prefill_step": 0}}, "EngineConfig.prefill_step"),
                         ({"config": {**fields["config"], "launcher": 1}}, "unknown field 'launcher'")]:
        with pytest.raises(ValueError, match=name):
            WorkerSpec.from_msgpack(msgpack.packb({**fields, **change}))
    without = {k: v for k, v in fields.items() if k != "control"}
    with pytest.raises(ValueError, match="missing field 'control'"):
        WorkerSpec.from_msgpack(msgpack.packb(without))
    assert replace(SPEC, model_dir="/node/stage").model_dir == "/node/stage"


def test_the_worker_takes_its_spec_on_stdin_only():
    """Nothing on its command line (the session key least of all); anything but a spec on
    stdin is refused in one line."""
    assert WORKER_ARGV == ("-m", "mlxdist.runtime.worker")
    for args, stdin, said in [([], b"", "(it is empty)"), ([], b"\x93\x01\x02\x03", "not a msgpack map"),
                              ([], msgpack.packb({"rank": 0}), "missing field 'ranks'"),
                              (["--rank", "0"], b"", "takes no arguments")]:
        r = subprocess.run([sys.executable, *WORKER_ARGV, *args], input=stdin, capture_output=True, timeout=60,
                           cwd=ROOT)
        err = r.stderr.decode()
        assert r.returncode == 1 and said in err and len(err.strip().splitlines()) == 1, err


# A throwaway engine option, end to end: its field, the worker's use of it, the flag of
# `mlxdist run`. (old, new) pairs per file under mlxdist/; every `old` must be there once.
THROWAWAY = {
    "runtime/config.py": [
        ("\n    def __post_init__(self) -> None:\n        check_fields(self)\n",
         '    throwaway_marker: str = ""\n'
         "\n    def __post_init__(self) -> None:\n        check_fields(self)\n"),
    ],
    "runtime/worker.py": [
        ("    a = read_spec()\n",
         "    a = read_spec()\n"
         "    if a.config.throwaway_marker:\n"
         '        open(f"{a.config.throwaway_marker}.rank{a.rank}", "w").write(a.model_dir)\n'),
    ],
    "runtime/cli.py": [
        ('@click.option("--handoff", ', '@click.option("--throwaway-marker", default="")\n@click.option("--handoff", '),
        ("handoff: str) -> None:", "handoff: str, throwaway_marker: str) -> None:"),
        ("handoff=handoff)", "handoff=handoff, throwaway_marker=throwaway_marker)"),
    ],
}


def apply_patch(root: Path, patch: dict[str, list[tuple[str, str]]]) -> None:
    for name, edits in patch.items():
        path = root / name
        text = path.read_text()
        for old, new in edits:
            if text.count(old) != 1:
                pytest.fail(f"the throwaway option's patch no longer applies: {name} has {text.count(old)} "
                            f"copies of {old!r} (want 1); has the engine config's design changed?")
            text = text.replace(old, new)
        path.write_text(text)


def test_a_new_engine_option_touches_at_most_four_files(tiny_models, tmp_path):
    touched = {f"mlxdist/{name}" for name in THROWAWAY} | {"tests/runtime/test_runtime_config.py"}
    assert len(touched) <= 4, sorted(touched)
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "mlxdist", copy / "mlxdist", ignore=shutil.ignore_patterns("__pycache__"))
    apply_patch(copy / "mlxdist", THROWAWAY)
    marker = tmp_path / "marker"
    r = subprocess.run([sys.executable, "-m", "mlxdist", "run", str(tiny_models["llama"]), "--ranks", "2",
                        "--throwaway-marker", str(marker), "-p", "hi", "-m", "3"],
                       capture_output=True, text=True, timeout=300, cwd=copy,
                       env=dict(os.environ, PYTHONPATH=str(copy)))
    assert r.returncode == 0, r.stderr
    # each rank (its own process, started from the patched copy) got the value in its spec
    assert [(tmp_path / f"marker.rank{k}").read_text() for k in (0, 1)] == [str(tiny_models["llama"])] * 2
