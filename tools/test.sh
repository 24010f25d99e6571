#!/usr/bin/env bash
# Sets up everything on a fresh machine and runs the test suite.
#   bash tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh ".[test]"
# Network-namespace tests need iproute2 (ip netns) and tc; the console's browser tests
# (tests/server/test_console_browser.py) need Debian's chromium and its chromedriver. As
# root, install what is missing (one `apt-get update`); what fails is skipped with a warning.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  _mlxdist_updated=
  _mlxdist_apt() {  # $1: what it is for; the rest: packages
    local what=$1; shift
    if [ -z "$_mlxdist_updated" ]; then
      apt-get update -qq || echo "warning: apt-get update failed" >&2
      _mlxdist_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
      || echo "warning: could not install $* ($what will be skipped)" >&2
  }
  command -v ip >/dev/null 2>&1 || _mlxdist_apt "the network-namespace tests" iproute2
  { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } \
    || _mlxdist_apt "the console's browser tests" chromium chromium-driver
  unset -f _mlxdist_apt
  unset _mlxdist_updated
fi
exec "$VENV/bin/python" -m pytest -q "$@"
