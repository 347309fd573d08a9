#!/usr/bin/env bash
# Regenerate tests/reference/data/ by running the OFFICIAL qwen-tts package on tiny
# random-weight checkpoints written by qwen3tts-rt. The official package runs in its own
# venv (.venv-ref, made by ref_venv.sh); sox/onnxruntime/torchaudio (used only by its
# 25 Hz tokenizer) are stubbed.
#
#   make reference            # = bash tests/reference/run_reference.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
REF_PY=$(bash tests/reference/ref_venv.sh)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Checkpoints: the same presets and seeds the tests rebuild (tests/test_reference.py).
.venv/bin/python -m tests.reference.checkpoints "$WORK"
"$REF_PY" tests/reference/make_reference.py "$WORK" tests/reference/data
echo "reference data written to tests/reference/data"
