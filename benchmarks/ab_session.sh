#!/usr/bin/env bash
# One-GPU A/B of archived decode versions against the shipped one: reference check, ours-only
# benchmark in shipped, CANDIDATE, OTHERS..., shipped order (drift shows as shipped vs shipped),
# then the four sanitizers and the GPU unit tests on the candidate.
#   OUT=... benchmarks/ab_session.sh CANDIDATE [OTHER ...]
# A version is a file stem in benchmarks/kernel_versions/, optionally with knobs:
# NAME+KEY=VALUE[+KEY=VALUE] compiles it with -DKEY=VALUE; a FLASHMLA_BACKEND_* key is set in
# the environment instead (e.g. shipped+FLASHMLA_BACKEND_TMA_L2_PROMOTION=0). AB_TIMING_ONLY=1 runs only the
# benchmarks (for diagnostics whose outputs are not a decode).
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=/tmp/cupy
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
candidate=${1:?candidate version}; shift

. "$(dirname "$0")/versions.sh"  # with_version

nvidia-smi --query-gpu=name --format=csv,noheader
python -c "import flashmla_backend as f; f.precompile()"
if [ -z "${AB_TIMING_ONLY:-}" ]; then
  with_version "$candidate" timeout 120 python benchmarks/check_decode_version.py --max-rows 512 \
    > "$OUT/${candidate//[+=]/_}.check" 2>&1
  rc=$?
  echo "== $candidate correctness (rc $rc): $(tail -1 "$OUT/${candidate//[+=]/_}.check")"
  if [ $rc -ne 0 ]; then  # wrong or hung: show the cases and stop before timing it
    grep -E "FAIL|ok  |columns|Error|error" "$OUT/${candidate//[+=]/_}.check" | tail -20
    exit 1
  fi
fi
n=0
for version in shipped "$candidate" "$@" shipped; do
  n=$((n + 1)); label=bench$n-${version//[+=]/_}
  with_version "$version" timeout 150 python -m flashmla_backend.bench --no-peers --no-plots \
    --out "$OUT/$label" > "$OUT/$label.md" 2> "$OUT/$label.err" \
    || { echo "bench of $version failed:"; tail -3 "$OUT/$label.err"; }
done
python benchmarks/ab_table.py "$OUT"/bench*/bench.json
[ -n "${AB_TIMING_ONLY:-}" ] && exit 0
with_version "$candidate" bash benchmarks/run_sanitizers.sh
with_version "$candidate" timeout 200 python -m pytest -q -p no:cacheprovider tests \
  > "$OUT/unit_tests.log" 2>&1
echo "GPU unit tests on $candidate: $(tail -1 "$OUT/unit_tests.log")"
