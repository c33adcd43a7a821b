#!/usr/bin/env bash
# Nsight Compute counters of the decode kernel, shipped against archived versions, on a memory
# row and a compute row (one GPU; ~3-4 min). Answers two open questions of NOTES.md: why a
# cp.async producer (v8; v17 with both completion schemes), faster alone, lost with the math
# present (shared-memory and LSU pipes), and how busy the tensor pipe is on the compute rows.
#   OUT=... [NCU_SHAPES="B S_Q H_Q S_K,..."] benchmarks/profile_ncu.sh [--shipped-only | VERSION ...]
#   (shipped always runs; default versions beside it: the shipped decode with the cp.async
#   producer forced, the pipeline diagnostic by TMA and by cp.async)
# A version as in versions.sh, peers included (peer:FA3-MLA needs the vLLM bundle).
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=/tmp/cupy
. "$(dirname "$0")/versions.sh"  # with_version, version_impl, version_kernel, find_ncu
OUT=${OUT:-/tmp/out}/ncu; mkdir -p "$OUT"
NCU=$(find_ncu) || { echo "ncu not found"; exit 1; }
"$NCU" --query-metrics > "$OUT/metric_names.txt" 2>&1
# The tensor-pipe metric's name differs between ncu versions: keep what this one offers.
grep -i -E "tensor|gmma" "$OUT/metric_names.txt" > "$OUT/tensor_metric_names.txt"
python -c "import flashmla_backend as f; f.precompile()"
# Only the candidates this ncu knows (an unknown name fails the whole run).
METRICS=""
for m in sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active \
         sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active \
         sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active \
         sm__inst_executed_pipe_tensor_op_gmma.sum \
         sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active \
         l1tex__data_pipe_lsu_wavefronts_mem_shared.sum \
         l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum \
         dram__throughput.avg.pct_of_peak_sustained_elapsed lts__t_sector_hit_rate.pct \
         l1tex__throughput.avg.pct_of_peak_sustained_active \
         lts__t_sectors_srcunit_tex_op_read.sum dram__bytes_read.sum \
         gpu__time_duration.sum; do
  grep -q "^${m%%.*} " "$OUT/metric_names.txt" && METRICS=${METRICS:+$METRICS,}$m
done
echo "metrics: ${METRICS:-none known; the WarpStateStats section only}"
METRIC_ARGS=(); [ -n "$METRICS" ] && METRIC_ARGS=(--metrics "$METRICS")
# Problems as "B S_Q H_Q S_K", comma-separated in NCU_SHAPES (default: a memory and a compute row).
IFS=, read -r -a SHAPES <<< "${NCU_SHAPES:-128 1 16 4096,128 2 128 4096}"
EXTRA=(shipped+FLASHMLA_BACKEND_KV_PRODUCER=cp_async mla_decode_diag_pipeline_only mla_decode_diag_pipeline_only+DIAG_CP_ASYNC=1)
if [ "${1:-}" = --shipped-only ]; then EXTRA=(); elif [ $# -gt 0 ]; then EXTRA=("$@"); fi
for version in shipped "${EXTRA[@]}"; do
  for shape in "${SHAPES[@]}"; do
    label=${version//[+=:]/_}_${shape// /x}
    with_version "$version" timeout 240 \
      "$NCU" --clock-control none --kernel-name-base demangled --kernel-name "$(version_kernel "$version")" \
      --launch-skip 2 --launch-count 1 "${METRIC_ARGS[@]}" --section WarpStateStats --csv --page raw \
      python benchmarks/profile_one_call.py $shape --impl "$(version_impl "$version")" \
      > "$OUT/$label.csv" 2> "$OUT/$label.err"
    echo "== $label (rc $?)"
    python - "$OUT/$label.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
head = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if head is None:
    print("  no ncu rows"); sys.exit()
names = rows[head]
col = names.index("Kernel Name")
values = next((r for r in rows[head + 1:] if len(r) > col and r[col] and r[col] != "Kernel Name"), None)
if values is None:
    print("  no kernel row"); sys.exit()
print(f"  kernel: {values[col][:100]}")
keep = ("gmma", "pipe_lsu", "mem_shared", "dram__", "hit_rate", "duration", "l1tex__throughput", "lts__t_sectors")
stalls = []
for n, v in zip(names, values):
    if v in ("", "n/a"):
        continue
    if any(k in n for k in keep):
        print(f"  {n} = {v}")
    elif "issue_stalled" in n and n.endswith(".ratio"):
        try:
            stalls.append((float(v.replace(",", "")), n))
        except ValueError:
            pass
for value, n in sorted(stalls, reverse=True)[:6]:  # the largest stall reasons
    print(f"  {n} = {value:g}")
PY
  done
done
