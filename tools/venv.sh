# Sourced by tools/demo.sh and tools/test.sh: make (once) and update the project's virtual
# environment. $1: what to install ("." or ".[test]"). Sets VENV.
#
# pip runs only when something changed: $VENV/.mlxdist-installed holds one line per
# install, "<sha256 of pyproject.toml> <this checkout> <what>"; a ".[test]" install covers
# "." too. setuptools' notice about editable installs ("Please be careful with folders in
# your working directory...") is dropped from pip's output; everything else pip says,
# errors above all, is shown.
VENV=${MLXDIST_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi

_mlxdist_stamp="$VENV/.mlxdist-installed"
_mlxdist_want="$("$VENV/bin/python" -c 'import hashlib, os
print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(), os.getcwd())')"

_mlxdist_installed() {  # $1: "." or ".[test]"
  [ -x "$VENV/bin/mlxdist" ] && [ -f "$_mlxdist_stamp" ] || return 1
  grep -qxF "$_mlxdist_want $1" "$_mlxdist_stamp" && return 0
  [ "$1" = "." ] && grep -qxF "$_mlxdist_want .[test]" "$_mlxdist_stamp"
}

_mlxdist_pip() {  # pip "$@", its output without setuptools' editable-install notice
  local log rc=0
  log="$(mktemp)"
  "$VENV/bin/python" -m pip "$@" >"$log" 2>&1 || rc=$?
  "$VENV/bin/python" - "$log" >&2 <<'EOF'
import re, sys
text = open(sys.argv[1], errors="replace").read()
# "  .../editable_wheel.py:NNN: <Some>Warning: Editable installation.\n  !!\n ... \n  !!\n    <source line>\n"
notice = r"[^\n]*Warning: Editable install[^\n]*\n[ \t]*!!\n.*?\n[ \t]*!!\n(?:[ \t]+\S[^\n]*\n)?"
sys.stderr.write(re.sub(notice, "", text, flags=re.S))
EOF
  rm -f "$log"
  return $rc
}

if ! _mlxdist_installed "$1"; then
  echo "installing mlxdist ($1) and its dependencies into $VENV ..." >&2
  _mlxdist_pip install -q --upgrade pip
  _mlxdist_pip install -q -e "$1"
  if [ -f "$_mlxdist_stamp" ] && ! grep -q "^$_mlxdist_want " "$_mlxdist_stamp"; then
    rm -f "$_mlxdist_stamp"  # pyproject.toml or the checkout changed: earlier installs no longer count
  fi
  echo "$_mlxdist_want $1" >>"$_mlxdist_stamp"
fi
unset -f _mlxdist_installed _mlxdist_pip
unset _mlxdist_stamp _mlxdist_want
