#!/usr/bin/env bash
# Sets up everything on a fresh machine and runs the demo: SmolLM2-135M-Instruct converted
# to 4-bit MLX shards, served on a 2-rank local cluster, and one chat answer on screen.
#   bash tools/demo.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MLXDIST_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e .
exec "$VENV/bin/mlxdist" demo "$@"
