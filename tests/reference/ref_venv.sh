#!/usr/bin/env bash
# Create the venv that runs the OFFICIAL qwen-tts package (.venv-ref), once. The official
# package pins transformers==4.57.3 and imports heavy audio packages, so it never shares the
# project's venv; it is installed with --no-deps. Used by `make reference`
# (tests/reference/run_reference.sh) and by the benchmarks (benchmarks/official.py).
#
#   bash tests/reference/ref_venv.sh      # prints the venv's python
#   REF_TORCH_SPEC="torch==2.x.y" ...     # another torch build (e.g. a CUDA one on a GPU machine)
set -euo pipefail
cd "$(dirname "$0")/../.."
REF=${REF_VENV:-.venv-ref}
PY=${PY:-python3.11}
if [ ! -x "$REF/bin/python" ] || [ ! -f "$REF/.installed" ]; then
  test -x "$REF/bin/python" || "$PY" -m venv "$REF"
  "$REF/bin/pip" install -q --upgrade pip >&2
  # shellcheck disable=SC2086 # the spec may carry pip options (an index)
  "$REF/bin/pip" install -q ${REF_TORCH_SPEC:-torch==2.13.0} >&2
  "$REF/bin/pip" install -q transformers==4.57.3 accelerate==1.12.0 einops safetensors \
      numpy librosa soundfile >&2
  "$REF/bin/pip" install -q --no-deps qwen-tts==0.1.1 >&2
  touch "$REF/.installed"
fi
echo "$REF/bin/python"
