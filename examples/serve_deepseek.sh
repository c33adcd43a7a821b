#!/usr/bin/env bash
# Serve DeepSeek models through vLLM 0.26 with flashmla_backend's decode kernels
# (vLLM's CUSTOM attention backend, registered by this package's vllm.general_plugins entry point).
#
# Needs a Hopper GPU (H100/H200/H800/H20) and:  pip install 'flashmla_backend[vllm]'
# KV cache: bf16/fp16 only (leave --kv-cache-dtype at auto).
#
#   examples/serve_deepseek.sh v2-lite       # DeepSeek-V2-Lite-Chat on 1 GPU
#   examples/serve_deepseek.sh v3            # DeepSeek-V3, tensor parallel 8 (8 x H200: the FP8
#                                            # weights, ~690 GB, do not fit 8 x 80 GB H100s)
#   examples/serve_deepseek.sh v3-mtp        # the same with DeepSeek MTP speculative decoding
#   examples/serve_deepseek.sh tiny [DIR]    # tiny random DeepSeek-V3 built locally, no download
#
# Extra arguments after the model name go to `vllm serve`. Query the server with
# examples/openai_client.py.
set -euo pipefail

which_model=${1:-v2-lite}
shift || true
port=${PORT:-8000}

case "$which_model" in
  v2-lite)
    exec vllm serve deepseek-ai/DeepSeek-V2-Lite-Chat \
      --attention-backend CUSTOM \
      --max-model-len 32768 \
      --gpu-memory-utilization 0.9 \
      --port "$port" "$@"
    ;;
  v3)
    exec vllm serve deepseek-ai/DeepSeek-V3 \
      --attention-backend CUSTOM \
      --tensor-parallel-size 8 \
      --max-model-len 32768 \
      --gpu-memory-utilization 0.9 \
      --port "$port" "$@"
    ;;
  v3-mtp)
    exec vllm serve deepseek-ai/DeepSeek-V3 \
      --attention-backend CUSTOM \
      --tensor-parallel-size 8 \
      --max-model-len 32768 \
      --gpu-memory-utilization 0.9 \
      --speculative-config '{"method": "mtp", "num_speculative_tokens": 1}' \
      --port "$port" "$@"
    ;;
  tiny)
    dir=${1:-/tmp/tiny-deepseek}
    shift || true
    [ -f "$dir/config.json" ] || python "$(dirname "$0")/make_tiny_deepseek.py" "$dir"
    exec vllm serve "$dir" \
      --attention-backend CUSTOM \
      --served-model-name tiny-deepseek \
      --max-model-len 4096 \
      --gpu-memory-utilization 0.3 \
      --port "$port" "$@"
    ;;
  *)
    echo "usage: $0 {v2-lite|v3|v3-mtp|tiny [DIR]} [vllm serve arguments...]" >&2
    exit 2
    ;;
esac
