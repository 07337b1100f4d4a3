#!/usr/bin/env bash
# Every check CI runs: lint, format, types, generated code, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
export PYTHONHASHSEED=0 OMP_NUM_THREADS=1

echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy (lpreg_core, services)"
"$VENV/bin/mypy" lpreg_core services
echo "== generated protobuf code"
"$VENV/bin/python" scripts/gen_protos.py --check

echo "== pytest"
set +e
# The slowest tests are listed at the end, so a suite that grows slow shows where.
"$VENV/bin/python" -m pytest --durations=25 "$@"
code=$?
set -e
if [ "$code" = 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$code"
