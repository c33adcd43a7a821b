#!/usr/bin/env bash
# One-GPU A/B of archived decode versions against the shipped one: reference check, ours-only
# benchmark in A B ... A order (drift shows as A vs A), sanitizers and the GPU unit tests on the
# candidate. Usage: OUT=... benchmarks/ab_session.sh CANDIDATE [OTHER_VERSION ...]
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=/tmp/cupy
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
candidate=${1:?candidate version}; shift
file_of() { [ "$1" = shipped ] && echo "" || echo "$PWD/benchmarks/kernel_versions/$1.cu"; }
nvidia-smi --query-gpu=name --format=csv,noheader
python -c "import flashmla_backend as f; f.precompile()"
FLASHMLA_BACKEND_DECODE_FILE=$(file_of "$candidate") timeout 120 python benchmarks/check_decode_version.py \
  --max-rows 512 > "$OUT/$candidate.check" 2>&1
echo "== $candidate correctness: $(tail -1 "$OUT/$candidate.check")"
n=0
for name in shipped "$candidate" "$@" shipped; do
  n=$((n + 1))
  FLASHMLA_BACKEND_DECODE_FILE=$(file_of "$name") timeout 150 python -m flashmla_backend.bench --no-peers \
    --no-plots --out "$OUT/bench$n-$name" > "$OUT/bench$n-$name.md" 2> "$OUT/bench$n-$name.err"
done
python benchmarks/ab_table.py "$OUT"/bench*/bench.json
FLASHMLA_BACKEND_DECODE_FILE=$(file_of "$candidate") bash benchmarks/run_sanitizers.sh
FLASHMLA_BACKEND_DECODE_FILE=$(file_of "$candidate") timeout 200 python -m pytest -q -p no:cacheprovider tests \
  > "$OUT/unit_tests_$candidate.log" 2>&1
echo "GPU unit tests on $candidate: $(tail -1 "$OUT/unit_tests_$candidate.log")"
