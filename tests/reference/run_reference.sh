#!/usr/bin/env bash
# Regenerate tests/reference/data/ by running the OFFICIAL qwen-tts package on tiny
# random-weight checkpoints written by qwen3tts-rt. The official package pins
# transformers==4.57.3 and imports heavy audio packages, so it runs in its own venv
# (.venv-ref); sox/onnxruntime/torchaudio (used only by its 25 Hz tokenizer) are stubbed.
#
#   make reference            # = bash tests/reference/run_reference.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
REF=.venv-ref
PY=${PY:-python3.11}
if [ ! -x "$REF/bin/python" ]; then
  "$PY" -m venv "$REF"
  "$REF/bin/pip" install -q --upgrade pip
  "$REF/bin/pip" install -q torch==2.13.0 transformers==4.57.3 accelerate==1.12.0 einops safetensors \
      numpy librosa soundfile
  "$REF/bin/pip" install -q --no-deps qwen-tts==0.1.1
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Checkpoints: the same presets and seeds the tests rebuild (tests/test_reference.py).
.venv/bin/python -m tests.reference.checkpoints "$WORK"
"$REF/bin/python" tests/reference/make_reference.py "$WORK" tests/reference/data
echo "reference data written to tests/reference/data"
