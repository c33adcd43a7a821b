#!/usr/bin/env bash
# Where the decode's warps stall, instruction by instruction: Nsight Compute's warp-state
# sampling of one decode launch, printed per SASS instruction, and its hot spots (one GPU;
# ~1 min per problem). Answers what the counters of profile_ncu.sh cannot: which instruction
# the long-scoreboard / barrier stalls sit on.
#   OUT=... benchmarks/profile_source.sh [VERSION] ["B S_Q H_Q S_K" ...]
# VERSION as in versions.sh (peers included); default problems: the 4096 memory row and
# 128,1,128.
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=/tmp/cupy
. "$(dirname "$0")/versions.sh"  # with_version, version_impl, version_kernel, find_ncu
OUT=${OUT:-/tmp/out}/source; mkdir -p "$OUT"
NCU=$(find_ncu) || { echo "ncu not found"; exit 1; }
version=${1:-shipped}; shift || true
[ $# -gt 0 ] || set -- "128 1 16 4096" "128 1 128 4096"
python -c "import flashmla_backend as f; f.precompile()"
for shape in "$@"; do
  label=${version//[+=:]/_}_${shape// /x}
  with_version "$version" timeout 300 \
    "$NCU" --clock-control none --kernel-name-base demangled --kernel-name "$(version_kernel "$version")" \
    --launch-skip 2 --launch-count 1 --section SourceCounters --section WarpStateStats -f -o "$OUT/$label" \
    python benchmarks/profile_one_call.py $shape --impl "$(version_impl "$version")" > "$OUT/$label.log" 2>&1
  echo "== $label (rc $?)"
  "$NCU" --import "$OUT/$label.ncu-rep" --page source --csv --print-source sass > "$OUT/$label.sass.csv" 2> "$OUT/$label.err" \
    || { echo "  source page failed: $(tail -2 "$OUT/$label.err")"; continue; }
  python benchmarks/stall_hotspots.py "$OUT/$label.sass.csv" --top 25
done
