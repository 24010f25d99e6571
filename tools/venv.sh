# Sourced by tools/demo.sh and tools/test.sh: make (once) and update the project's virtual
# environment. $1: what to install ("." or ".[test]"). Sets VENV.
VENV=${MLXDIST_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e "$1"
