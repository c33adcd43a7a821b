#!/usr/bin/env bash
# Runs benchmarks/sanitizer_cases.py under compute-sanitizer's memcheck, racecheck, synccheck
# and initcheck on the GPU machine and prints one line per tool with its error count.
# The kernels are compiled once first, outside the sanitizer (NVRTC under it is slow).
# SANITIZER_TOOLS picks a subset (default: all four).
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/cupy}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -c "import flashmla_backend as f; f.precompile()"
for tool in ${SANITIZER_TOOLS:-memcheck racecheck synccheck initcheck}; do
  extra=""
  [ "$tool" = memcheck ] && extra="--leak-check no"
  timeout 600 compute-sanitizer --tool "$tool" $extra --print-limit 20 \
      python benchmarks/sanitizer_cases.py > "$OUT/sanitizer_$tool.log" 2>&1
  rc=$?
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer_$tool.log" | tail -1)
  echo "$tool: exit $rc; ${summary:-no summary line}; $(grep -c 'rel err' "$OUT/sanitizer_$tool.log") cases ran"
done
