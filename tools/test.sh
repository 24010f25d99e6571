#!/usr/bin/env bash
# Sets up everything on a fresh machine and runs the test suite.
#   bash tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MLXDIST_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e ".[test]"
# Network-namespace tests need iproute2 (ip netns) and tc; install them when we can.
if [ "$(id -u)" = 0 ] && ! command -v ip >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null) || echo "warning: could not install iproute2"
fi
exec "$VENV/bin/python" -m pytest -q "$@"
