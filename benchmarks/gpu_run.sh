#!/usr/bin/env bash
# Every GPU measurement of the fast path in one command (issue 16): setup (carried wheels,
# gRPC stubs), random checkpoints built in the background, then each stage under its own
# time budget; at most 8 files in $OUT. See benchmarks/gpu_recipe.md for the device call.
#
#   bash benchmarks/gpu_run.sh                              # the GPU machine: 0.6B + 1.7B into $OUT
#   bash benchmarks/gpu_run.sh --device cpu --preset tiny   # the dry run (make gpu-dry-run)
#   bash benchmarks/gpu_run.sh --help                       # stages, budgets, folders
#
# Python: $PYTHON, else the project's venv when it is installed, else python3 (the GPU
# machine's, which holds torch).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -x .venv/bin/python ] && [ -f .venv/bin/.installed ]; then
    py=.venv/bin/python
else
    py=python3
fi
exec "$py" -m benchmarks.gpu_run "$@"
