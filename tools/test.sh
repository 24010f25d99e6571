#!/usr/bin/env bash
# Sets up everything on a fresh machine and runs the test suite.
#   bash tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh ".[test]"
# Network-namespace tests need iproute2 (ip netns) and tc; install them when we can.
if [ "$(id -u)" = 0 ] && ! command -v ip >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null) || echo "warning: could not install iproute2"
fi
exec "$VENV/bin/python" -m pytest -q "$@"
