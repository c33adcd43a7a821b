#!/usr/bin/env bash
# One device session for a kernel version: GPU tests, the side-by-side benchmark (peers from
# the vLLM bundle at /tmp/vsite when installed), then earlier kernel versions alone for an
# A/B on the same card in the same session. Logs and JSON go to $OUT.
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=/tmp/cupy
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
(cd tests && timeout 240 python -m pytest -q test_gpu_decode.py -p no:cacheprovider 2>&1 | tail -3) | tee "$OUT/gpu_tests.log"
timeout 300 python -m flashmla_backend.bench --out "$OUT" "$@" 2>"$OUT/bench.err" | tee "$OUT/bench.md"
for v in benchmarks/kernel_versions/*.cu; do
  name=$(basename "$v" .cu)
  echo "== $name (ours only)"
  FLASHMLA_BACKEND_DECODE_FILE=$PWD/$v timeout 90 python -m flashmla_backend.bench --no-peers --no-plots \
    --no-check --iters 20 --out "$OUT/$name" 2>/dev/null | grep -E "^\| (memory|mixed|compute|latency)" | cut -d'|' -f2,3
done
