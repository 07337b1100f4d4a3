#!/usr/bin/env bash
# Prepare .gpu_carry/: what scripts/gpu_check.sh needs on a GPU machine that has no package
# registry. That machine has Python 3.12 with torch (CUDA), triton, transformers 5, tokenizers,
# safetensors, numpy, grpcio, protobuf, prometheus-client, matplotlib and tensorboard; this
# fetches the rest:
#   wheels/  lpreg's other runtime dependencies (cp312, manylinux x86_64), at the versions this
#            venv tests, so `import services.cli` and `lpreg local` work there, and Liger-Kernel
#            for the fused-loss benchmark
#   debs/    redis-server 7.0 and the libraries it links that a slim image may lack (Debian
#            packages, unpacked there with dpkg -x; only redis-server sees their library path)
# Run it here (it needs PyPI and the Debian mirror), then carry the folder to the GPU machine.
# The whole folder stays under 64 MiB.
#
#   bash scripts/gpu_carry.sh            # writes .gpu_carry/ (ignored by git) for Python 3.12
#   bash scripts/gpu_carry.sh --full     # also the stack a bare Python lacks (over 64 MiB)
# GPU_PYTHON_VERSION=3.11 and LPREG_GPU_CARRY=DIR pick another Python and folder.
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=${LPREG_GPU_CARRY:-.gpu_carry}
# The GPU machine's Python (wheels are picked for it).
PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}
abi=cp${PYTHON_VERSION//./}
LIMIT_BYTES=$((64 * 1024 * 1024))
PY=.venv/bin/python
# Imported by lpreg's services and missing from a CUDA image that already brings PyTorch's usual
# companions (transformers 5, tokenizers, matplotlib, tensorboard, rich, PyYAML, numpy). grpcio and
# protobuf come too: the generated code checks that the runtime is at least the version it was
# generated with.
PACKAGES=(
  pydantic pydantic-core annotated-types typing-inspection
  redis grpcio grpcio-health-checking protobuf blake3
  math-verify latex2sympy2-extended antlr4-python3-runtime
)
# Liger-Kernel, the anchor of the fused-loss benchmark (pure Python on top of torch and triton).
ANCHORS=(liger-kernel==0.8.5)
# With --full: the rest of lpreg's runtime stack, for an image that lacks it (matplotlib draws the
# run's plots at the end of `lpreg local`, tensorboard writes the learner's event files,
# transformers 5 reads the tiny model's config). Over 64 MiB with everything above: use it where
# the folder need not travel through a size limit.
FULL=(
  typing-extensions PyYAML rich markdown-it-py mdurl pygments
  matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil tzdata
  tensorboard absl-py markdown werkzeug markupsafe
  transformers huggingface-hub tokenizers httpx2 httpcore2 anyio h11 idna truststore
  click typer shellingham annotated-doc filelock fsspec packaging tqdm regex
)
if [ "${1:-}" = "--full" ]; then PACKAGES+=("${FULL[@]}"); fi
DEBS=(redis-server redis-tools libjemalloc2 liblzf1 libssl3 libatomic1)

rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/debs"

pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  pins+=("$name==$version")
done
pins+=("${ANCHORS[@]}")
printf '%s\n' "${pins[@]}" > "$CARRY/requirements.txt"

# --isolated: PyPI's wheels for the GPU machine's Python, never this machine's local wheel folders.
"$PY" -m pip --isolated download --quiet --disable-pip-version-check --no-deps \
  --only-binary=:all: --implementation cp --python-version "$PYTHON_VERSION" --abi "$abi" --abi abi3 \
  --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  -d "$CARRY/wheels" -r "$CARRY/requirements.txt"

(cd "$CARRY/debs" && apt-get download "${DEBS[@]}" 2> >(grep -v "unsandboxed as root" >&2 || true))

size=$(du -sb "$CARRY" | cut -f1)
if [ "$size" -gt "$LIMIT_BYTES" ]; then
  echo "gpu_carry: $CARRY is $size bytes, over the 64 MiB limit" >&2
  exit 1
fi
echo "gpu_carry: $CARRY ready ($((size / 1024 / 1024)) MiB: $(ls "$CARRY/wheels" | wc -l) wheels, $(ls "$CARRY/debs" | wc -l) debs)"
