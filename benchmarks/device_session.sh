#!/usr/bin/env bash
# Stages of one device session on a 2-GPU machine (nvidia-h100-x2 / nvidia-h200-x2), so that
# independent work runs on both GPUs at once. Logs go to $OUT; each stage prints a short
# summary last. Stages after "unit" need the vLLM bundle installed at /tmp/vsite
# (../shared/devkit/README.md).
#
#   benchmarks/device_session.sh unit          # GPU tests (GPU 0) | sanitizers (GPU 1) on the
#                                              # shipped decode, or on SANITIZE_VERSION if set
#   benchmarks/device_session.sh kernels       # side-by-side kernel benchmark, the no-split
#                                              # rule's A/B, archived versions (GPU 0 alone)
#   benchmarks/device_session.sh sanitize [V]  # compute-sanitizer on version V (or the shipped)
#   benchmarks/device_session.sh integration A # integration tests in two lanes, one per GPU
#                                              # (groups A, B, C; see below)
#   benchmarks/device_session.sh tp            # tensor parallel 2 (both GPUs)
#   benchmarks/device_session.sh e2e [--swap-gpus --backends CUSTOM FLASHMLA]  # end-to-end
#                                              # throughput, 2 backends at a time
#   benchmarks/device_session.sh pytest G NAME ARGS...  # one pytest lane on GPU G (log NAME.log),
#                                              # to run beside another stage on the other GPU
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=/tmp/cupy
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -f /tmp/vsite/env.sh ] && . /tmp/vsite/env.sh
TINY=/tmp/tiny-deepseek

tiny_model() {
  [ -f "$TINY/config.json" ] || python examples/make_tiny_deepseek.py "$TINY" > "$OUT/tiny_model.log" 2>&1
  export FLASHMLA_TINY_DEEPSEEK_DIR=$TINY
}

# A test that hangs (a kernel waiting on a barrier forever) fails alone after 300 s.
PER_TEST_TIMEOUT=$(python -c "import pytest_timeout" 2>/dev/null && echo "--timeout=300")

# pytest on one GPU: pytest_on GPU LOGNAME ARGS...
pytest_on() {
  local gpu=$1 name=$2; shift 2
  VLLM_CACHE_ROOT=/tmp/vllm-cache-gpu$gpu CUDA_VISIBLE_DEVICES=$gpu timeout 900 python -m pytest -q -ra \
    -p no:cacheprovider $PER_TEST_TIMEOUT "$@" > "$OUT/$name.log" 2>&1
  echo "$name (GPU $gpu): $(tail -1 "$OUT/$name.log")"
}

stage=${1:?stage}; shift
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
case $stage in
unit)
  python -c "import flashmla_backend as f; f.precompile()"
  pytest_on 0 unit_tests tests &
  (if [ -n "${SANITIZE_VERSION:-}" ]; then
     export FLASHMLA_BACKEND_DECODE_FILE=$PWD/benchmarks/kernel_versions/$SANITIZE_VERSION.cu
     echo "sanitizers on $SANITIZE_VERSION"
   fi
   CUDA_VISIBLE_DEVICES=1 bash benchmarks/run_sanitizers.sh) > "$OUT/sanitizers.txt" 2>&1 &
  wait
  cat "$OUT/sanitizers.txt"
  grep -E "passed|failed|error" "$OUT/unit_tests.log" | tail -3
  ;;
kernels)
  # Side-by-side table (shipped kernel + peers); then, on the same GPU, ours alone with the
  # scheduler's no-split rule off (its A/B); then archived versions from VERSIONS (default none),
  # each first through check_decode_version.py; with WITH_PLAIN=1, plain launches (PDL off).
  CUDA_VISIBLE_DEVICES=0 timeout 300 python -m flashmla_backend.bench --out "$OUT/bench" "$@" \
    2> "$OUT/bench.err" > "$OUT/bench.md"
  ours_only() {  # ours_only LABEL ROWS [ENV=VALUE...]
    local label=$1 rows=$2; shift 2
    env "$@" CUDA_VISIBLE_DEVICES=0 timeout 150 python -m flashmla_backend.bench --no-peers --no-plots \
      --rows "$rows" --out "$OUT/$label" > "$OUT/$label.md" 2> "$OUT/$label.err"
    echo "== $label (ours only, rc $?)"; grep -E "^\| (memory|mixed|compute|latency)|Whole" "$OUT/$label.md" | cut -d'|' -f2,3
  }
  ours_only no_split_slack_0 "memory" FLASHMLA_BACKEND_NO_SPLIT_SLACK=0
  for name in ${VERSIONS:-}; do
    file=$PWD/benchmarks/kernel_versions/$name.cu
    FLASHMLA_BACKEND_DECODE_FILE=$file CUDA_VISIBLE_DEVICES=0 timeout 120 \
      python benchmarks/check_decode_version.py --max-rows 512 > "$OUT/$name.check" 2>&1
    echo "== $name correctness: $(tail -1 "$OUT/$name.check")"
    ours_only "$name" "" FLASHMLA_BACKEND_DECODE_FILE="$file"
  done
  [ "${WITH_PLAIN:-0}" = 1 ] && ours_only plain "" FLASHMLA_BACKEND_PDL=0
  cat "$OUT/bench.md"
  ;;
sanitize)
  # Sanitizers on an archived decode version (default: the shipped kernel): sanitize [NAME]
  if [ -n "${1:-}" ]; then export FLASHMLA_BACKEND_DECODE_FILE=$PWD/benchmarks/kernel_versions/$1.cu; fi
  CUDA_VISIBLE_DEVICES=${GPU:-0} bash benchmarks/run_sanitizers.sh
  ;;
integration)
  tiny_model
  group=${1:-A}
  case $group in
  A)
    pytest_on 0 it_parity128_fp8 integration_tests/test_offline_parity.py -k "128 or fp8" &
    pytest_on 1 it_prefix_mixed integration_tests/test_prefix_cache_preemption.py \
      integration_tests/test_offline_parity.py::test_custom_matches_flashmla_with_mixed_prefill_and_decode & ;;
  B)
    FLASHMLA_SOAK_REPORT=$OUT/soak_report.json pytest_on 0 it_soak integration_tests/test_serving_soak.py &
    pytest_on 1 it_mtp_forward_server integration_tests/test_mtp_speculative.py \
      integration_tests/test_backend_forward.py integration_tests/test_openai_server.py & ;;
  C)
    pytest_on 0 it_parity64_eager integration_tests/test_offline_parity.py -k "eager-64" &
    pytest_on 1 it_parity64_cudagraph integration_tests/test_offline_parity.py -k "cudagraph-64" & ;;
  esac
  wait
  ;;
tp)
  tiny_model
  CUDA_VISIBLE_DEVICES=0,1 timeout 600 python -m pytest -q -ra -p no:cacheprovider \
    integration_tests/test_tensor_parallel.py > "$OUT/it_tp2.log" 2>&1
  echo "it_tp2 (GPUs 0,1): $(tail -1 "$OUT/it_tp2.log")"
  ;;
pytest)
  tiny_model
  pytest_on "$@"
  ;;
e2e)
  timeout 590 python benchmarks/e2e_vllm.py --out "$OUT/e2e" --parallel-gpus 2 "$@" 2>&1 | tail -14
  ;;
*)
  echo "unknown stage $stage"; exit 2
  ;;
esac
