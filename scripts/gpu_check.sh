#!/usr/bin/env bash
# One prepared run of benchmarks/gpu_check.py on a GPU machine without a package registry: the
# learner's CUDA step against the CPU float64 step, its speed on a Qwen2.5-1.5B-shaped model, and
# a 50-step `lpreg local` on the GPU. About 3 to 5 minutes on one H100 or H200; 8 at most.
#
# The machine brings Python 3.12 with torch (CUDA), triton, transformers, safetensors, numpy,
# grpcio, protobuf and prometheus-client. Everything else comes from .gpu_carry/ (prepare it with
# scripts/gpu_carry.sh where PyPI is reachable): wheels go to a private folder on PYTHONPATH,
# redis-server is unpacked from its Debian packages and run through a wrapper that gives only it
# the carried libraries.
#
#   bash scripts/gpu_check.sh                  # writes benchmarks/results/gpu-check.json (and $OUT/)
#   bash scripts/gpu_check.sh --skip speed     # extra arguments go to benchmarks/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

PYTHON=${PYTHON:-python3}
CARRY=${LPREG_GPU_CARRY:-$REPO/.gpu_carry}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lpreg-gpu-check.XXXXXX")
SITE=$WORK/site
CHECK_TIMEOUT_S=${LPREG_GPU_CHECK_TIMEOUT_S:-480}

[ -d "$CARRY/wheels" ] || { echo "gpu_check: no $CARRY/wheels; run scripts/gpu_carry.sh first" >&2; exit 2; }
want=$(ls "$CARRY"/wheels/pydantic_core-*.whl | sed -n 's/.*-cp\([0-9]\)\([0-9]*\)-.*/\1.\2/p')
have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$want" = "$have" ] || { echo "gpu_check: $CARRY holds wheels for Python $want, $PYTHON is $have" >&2; exit 2; }

# pip refuses to touch a distribution's Python (PEP 668) unless told; --target writes only $SITE.
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
"$PYTHON" -m pip install --quiet --no-deps --target "$SITE" --find-links "$CARRY/wheels" \
  -r "$CARRY/requirements.txt"
"$PYTHON" -c 'import sys, transformers; sys.exit(int(transformers.__version__.split(".")[0]) < 5)' || {
  echo "gpu_check: lpreg needs transformers 5 (prepare the folder with scripts/gpu_carry.sh --full)" >&2
  exit 2
}

# LPREG_GPU_CARRIED_REDIS=1 uses the carried redis-server even where one is installed.
if [ -z "${LPREG_GPU_CARRIED_REDIS:-}" ] && command -v redis-server >/dev/null 2>&1; then
  echo "gpu_check: using $(command -v redis-server)" >&2
else
  root=$WORK/redis
  for deb in "$CARRY"/debs/*.deb; do dpkg-deb -x "$deb" "$root"; done
  mkdir -p "$WORK/bin"
  cat > "$WORK/bin/redis-server" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$root/usr/bin/redis-server" "\$@"
EOF
  chmod +x "$WORK/bin/redis-server"
  export PATH=$WORK/bin:$PATH
  redis-server --version >&2
fi

export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
"$PYTHON" -c 'import services.cli'
status=0
timeout "$CHECK_TIMEOUT_S" "$PYTHON" benchmarks/gpu_check.py --e2e-dir "$WORK/e2e" "$@" || status=$?
if [ -n "${OUT:-}" ] && [ -d "$WORK/e2e/logs" ]; then
  cp -r "$WORK/e2e/logs" "$OUT/e2e-logs"  # the end-to-end run's logs, for a look at a failure
fi
echo "gpu_check: exit $status (0: every part passed; 1: a part failed, see the JSON; 124: timeout)" >&2
exit "$status"
