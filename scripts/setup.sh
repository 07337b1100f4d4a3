#!/usr/bin/env bash
# Set up everything lpreg needs on this machine: Debian packages (as root), .venv, the project.
# Re-running is quick: the venv is rebuilt only when pyproject.toml or this script change.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.lpreg-installed
EXTRAS=${LPREG_EXTRAS:-dev}

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${need_apt[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing ${need_apt[*]}; install them, e.g. 'sudo apt-get install ${need_apt[*]}'" >&2
    [[ " ${need_apt[*]} " == *" redis-server "* ]] && exit 1
  fi
fi

"$PYTHON" - <<'PY' || { echo "setup: Python >= 3.11 is required (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: a bare `torch` requirement could pull a multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0" 2> >(grep -v "^WARNING: Location" >&2)
"${PIP[@]}" -e ".[$EXTRAS]" 2> >(grep -v "^WARNING: Location" >&2)
echo "$want" > "$STAMP"
echo "setup: $VENV ready (extras: $EXTRAS)"
