#!/usr/bin/env bash
# Sets up everything on a fresh machine and runs the demo: SmolLM2-135M-Instruct converted
# to MLX shards (its 4-bit weights kept 4-bit), served on a 2-rank local cluster, and one chat answer on screen.
#   bash tools/demo.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh "."
exec "$VENV/bin/mlxdist" demo "$@"
