"""Helpers shared by the cluster tests (imported by name: pytest puts tests/cluster on
sys.path, as the directory has no __init__.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

SECRET = b"0123456789abcdef0123456789abcdef-test-secret"
CLUSTER = "testcluster"


def make_stage(root: Path, k: int = 0, weights_bytes: int = 3 * (1 << 20) + 12345) -> Path:
    """A stage directory laid out as docs/shard-format.md says (contents random)."""
    d = root / "stages" / str(k)
    d.mkdir(parents=True)
    (d / "stage.json").write_text(json.dumps({"format_version": 1, "stage": k, "num_stages": 2,
                                              "layers": [0, 2], "has_embedding": k == 0,
                                              "has_head": k == 1}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "vocab": list("abc")}))
    (d / "weights.safetensors").write_bytes(os.urandom(weights_bytes))
    return d
