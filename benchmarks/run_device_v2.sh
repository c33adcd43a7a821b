#!/usr/bin/env bash
# One device session: GPU tests, then the side-by-side benchmark, then a split-overhead sweep
# of our kernel alone. Expects the vLLM bundle at /tmp/vsite (see ../shared/devkit/README.md).
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=/tmp/cupy
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
(cd tests && timeout 240 python -m pytest -q test_gpu_decode.py -p no:cacheprovider 2>&1 | tail -3) | tee "$OUT/gpu_tests.log"
timeout 300 python -m flashmla_backend.bench --out "$OUT" 2>"$OUT/bench.err" | tee "$OUT/bench.md"
for ovh in 2 3 8; do
  echo "== split overhead $ovh"
  FLASHMLA_BACKEND_SPLIT_OVERHEAD=$ovh timeout 60 python -m flashmla_backend.bench --no-peers --no-plots \
    --no-check --out "$OUT/ovh$ovh" 2>/dev/null | grep -E "^\| (memory|latency|compute: 128, 2, 128, varlen)"
done
