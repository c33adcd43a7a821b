#!/usr/bin/env bash
# The open kernel questions of benchmarks/NOTES.md, on a one-GPU machine (pipeline, parts and
# overhead ran on an H200 on 2026-11-28: results/h200_run8/experiments/). Logs under
# $OUT/<experiment>/; each prints its table.
#   OUT=... benchmarks/device_experiments.sh [EXPERIMENT ...]   (default: next)
#   pipeline: v1 without the math, 2 and 3 stages (is the KV ring the memory-row bound?)
#   parts:    memory rows with the scheduler capped at 128 parts (no splits, no combine work),
#             no-split rule off (FLASHMLA_BACKEND_NO_SPLIT_SLACK=0) so the cap alone differs
#   overhead: latency and varlen rows with the scheduler's per-split cost at 2, 5 (shipped),
#             10 and 20 pages (fewer, longer splits for small batches)
#   hold:     the pipeline diagnostic with each stage held 1.5 us (the math's hold time at
#             h_q = 16), 2 and 3 stages: is a held 2-stage ring latency-bound? And the same
#             pipeline loading by cp.async from 128 threads instead of TMA (~3 min)
#   v13:      L2 prefetch of pages 1, 2 and 4 ahead of the ring (TMA tensor prefetch): reference
#             check at 2, timing-only A/B of the three depths (~3 min)
#   v14:      the first 4 / 8 k16 slices of Q from registers in the scores wgmma (a probe of the
#             shared-memory-bandwidth reading), and 0 (v10 with v14's register split):
#             reference check at 8, timing-only A/B (~3.5 min)
#   v16:      P in the page's rope chunk, one P_READY per stage, no P_FREE named barrier: A/B,
#             reference check, sanitizers, GPU unit tests (~3.5 min)
#   next:     the first call of the fifth session: reference checks of v13, v14, v16 and v17,
#             then one timing-only A/B of v13 (2 and 4 pages), v14 (8, 4, 0 slices), v16 and v17
#             (producer fence, and v8's consumer fence) (~6 min)
#   v18:      the producer chosen per launch (cp.async for one query block, TMA for several):
#             reference check, A/B beside v17 and v16, sanitizers, GPU unit tests (~5 min)
#   v19:      pages as 72 boxes of one 8-token swizzle atom each, and the KV map's L2 promotion
#             (none, 128B; shipped 256B): reference check, timing-only A/B (~4 min)
#   verify:   the shipped decode: reference check with each KV producer forced, the four
#             sanitizers with the cp.async producer forced, GPU unit tests (~4 min)
#   combine:  the combine with 1, 4 (shipped) and 8 partial rows in flight per warp, ours only,
#             timing-only A/B (~1.5 min)
#   producer: the shipped per-card producer rule against TMA and cp.async forced, and the
#             combine at 1 row in flight, ours only, timing-only A/B (~2 min)
#   profile:  Nsight Compute counters (tensor pipe, shared-memory wavefronts, DRAM, stalls) of
#             the shipped decode, v17 both ways and the pipeline diagnostic (TMA, cp.async),
#             memory and compute row (~4 min)
#   anatomy:  per-kernel GPU time and idle gaps of our call and the peers' on the latency rows
#             (benchmarks/latency_anatomy.py; needs the vLLM bundle for the peers; ~1 min)
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=/tmp/cupy
ROOT_OUT=${OUT:-/tmp/out}
run() { mkdir -p "$ROOT_OUT/$1"; echo "=== $1"; }
for experiment in ${@:-next}; do
  case $experiment in
  pipeline)
    run pipeline
    OUT=$ROOT_OUT/pipeline AB_TIMING_ONLY=1 timeout 400 bash benchmarks/ab_session.sh \
      mla_decode_diag_pipeline_only mla_decode_diag_pipeline_only+DIAG_STAGES=3 ;;
  parts)
    run parts
    for n in 1 2; do
      for cap in "" 128; do
        label=parts${cap:-_default}_run$n
        FLASHMLA_BACKEND_NO_SPLIT_SLACK=0 FLASHMLA_BACKEND_MAX_SM_PARTS=$cap timeout 120 python -m flashmla_backend.bench --no-peers --no-plots \
          --rows "memory" --out "$ROOT_OUT/parts/$label" > "$ROOT_OUT/parts/$label.md" 2>&1
        echo "$label:"; grep -E "^\| memory" "$ROOT_OUT/parts/$label.md" | cut -d'|' -f2,3
      done
    done ;;
  overhead)
    run overhead
    n=0
    for pages in 5 2 10 20 5; do
      n=$((n + 1)); label=overhead${n}_$pages
      FLASHMLA_BACKEND_SPLIT_OVERHEAD=$pages timeout 120 python -m flashmla_backend.bench --no-peers --no-plots \
        --rows "" --out "$ROOT_OUT/overhead/$label" > "$ROOT_OUT/overhead/$label.md" 2>&1
      echo "$label:"; grep -E "^\| (latency|memory: 128, 1, 16, varlen|compute: 128, 2, 128, varlen)|Whole" \
        "$ROOT_OUT/overhead/$label.md" | cut -d'|' -f2,3
    done ;;
  hold)
    run hold
    OUT=$ROOT_OUT/hold AB_TIMING_ONLY=1 timeout 400 bash benchmarks/ab_session.sh \
      mla_decode_diag_pipeline_only mla_decode_diag_pipeline_only+DIAG_HOLD_NS=1500 \
      mla_decode_diag_pipeline_only+DIAG_STAGES=3+DIAG_HOLD_NS=1500 \
      mla_decode_diag_pipeline_only+DIAG_CP_ASYNC=1 \
      mla_decode_diag_pipeline_only+DIAG_CP_ASYNC=1+DIAG_HOLD_NS=1500 ;;
  v13)
    run v13
    FLASHMLA_BACKEND_DECODE_FILE=$PWD/benchmarks/kernel_versions/mla_decode_v13_l2_prefetch.cu timeout 120 \
      python benchmarks/check_decode_version.py --max-rows 512 > "$ROOT_OUT/v13/check.log" 2>&1
    echo "== v13 correctness (rc $?): $(tail -1 "$ROOT_OUT/v13/check.log")"
    OUT=$ROOT_OUT/v13 AB_TIMING_ONLY=1 timeout 420 bash benchmarks/ab_session.sh \
      mla_decode_v13_l2_prefetch+L2_PREFETCH_PAGES=2 mla_decode_v13_l2_prefetch+L2_PREFETCH_PAGES=1 \
      mla_decode_v13_l2_prefetch+L2_PREFETCH_PAGES=4 ;;
  v14)
    run v14
    FLASHMLA_BACKEND_DECODE_FILE=$PWD/benchmarks/kernel_versions/mla_decode_v14_q_fragments_in_registers.cu \
      timeout 120 python benchmarks/check_decode_version.py --max-rows 512 > "$ROOT_OUT/v14/check.log" 2>&1
    echo "== v14 correctness (rc $?): $(tail -1 "$ROOT_OUT/v14/check.log")"
    OUT=$ROOT_OUT/v14 AB_TIMING_ONLY=1 timeout 480 bash benchmarks/ab_session.sh \
      mla_decode_v14_q_fragments_in_registers+Q_REG_STEPS=8 mla_decode_v14_q_fragments_in_registers+Q_REG_STEPS=4 \
      mla_decode_v14_q_fragments_in_registers+Q_REG_STEPS=0 ;;
  v16)
    run v16
    OUT=$ROOT_OUT/v16 timeout 560 bash benchmarks/ab_session.sh mla_decode_v16_p_in_rope_chunk ;;
  next)
    run next
    for version in mla_decode_v13_l2_prefetch mla_decode_v14_q_fragments_in_registers mla_decode_v16_p_in_rope_chunk \
                   mla_decode_v17_cp_async_producer_fence; do
      FLASHMLA_BACKEND_DECODE_FILE=$PWD/benchmarks/kernel_versions/$version.cu timeout 120 \
        python benchmarks/check_decode_version.py --max-rows 512 > "$ROOT_OUT/next/$version.check" 2>&1
      echo "== $version correctness (rc $?): $(tail -1 "$ROOT_OUT/next/$version.check")"
    done
    OUT=$ROOT_OUT/next AB_TIMING_ONLY=1 timeout 480 bash benchmarks/ab_session.sh \
      mla_decode_v13_l2_prefetch+L2_PREFETCH_PAGES=2 mla_decode_v13_l2_prefetch+L2_PREFETCH_PAGES=4 \
      mla_decode_v14_q_fragments_in_registers+Q_REG_STEPS=8 mla_decode_v14_q_fragments_in_registers+Q_REG_STEPS=4 \
      mla_decode_v14_q_fragments_in_registers+Q_REG_STEPS=0 mla_decode_v16_p_in_rope_chunk \
      mla_decode_v17_cp_async_producer_fence mla_decode_v17_cp_async_producer_fence+PRODUCER_FENCE=0 ;;
  v18)
    run v18
    OUT=$ROOT_OUT/v18 timeout 580 bash benchmarks/ab_session.sh mla_decode_v18_producer_by_regime \
      mla_decode_v17_cp_async_producer_fence mla_decode_v16_p_in_rope_chunk ;;
  v19)
    run v19
    FLASHMLA_BACKEND_DECODE_FILE=$PWD/benchmarks/kernel_versions/mla_decode_v19_atom_boxes.cu timeout 120 \
      python benchmarks/check_decode_version.py --max-rows 512 > "$ROOT_OUT/v19/check.log" 2>&1
    echo "== v19 correctness (rc $?): $(tail -1 "$ROOT_OUT/v19/check.log")"
    OUT=$ROOT_OUT/v19 AB_TIMING_ONLY=1 timeout 480 bash benchmarks/ab_session.sh mla_decode_v19_atom_boxes \
      shipped+FLASHMLA_BACKEND_TMA_L2_PROMOTION=0 shipped+FLASHMLA_BACKEND_TMA_L2_PROMOTION=2 \
      mla_decode_v19_atom_boxes+FLASHMLA_BACKEND_TMA_L2_PROMOTION=0 \
      mla_decode_diag_pipeline_only mla_decode_diag_pipeline_only+FLASHMLA_BACKEND_TMA_L2_PROMOTION=0 ;;
  verify)
    run verify
    for producer in tma cp_async; do
      FLASHMLA_BACKEND_KV_PRODUCER=$producer timeout 120 python benchmarks/check_decode_version.py --max-rows 512 \
        > "$ROOT_OUT/verify/check_$producer.log" 2>&1
      echo "== shipped, $producer producer, correctness (rc $?): $(tail -1 "$ROOT_OUT/verify/check_$producer.log")"
    done
    FLASHMLA_BACKEND_KV_PRODUCER=cp_async OUT=$ROOT_OUT/verify bash benchmarks/run_sanitizers.sh
    timeout 240 python -m pytest -q -p no:cacheprovider tests > "$ROOT_OUT/verify/unit_tests.log" 2>&1
    echo "GPU unit tests: $(tail -1 "$ROOT_OUT/verify/unit_tests.log")" ;;
  combine)
    run combine
    OUT=$ROOT_OUT/combine AB_TIMING_ONLY=1 timeout 300 bash benchmarks/ab_session.sh \
      shipped+FLASHMLA_BACKEND_COMBINE_DEFINES=-DCOMBINE_SPLITS_IN_FLIGHT=1 \
      shipped+FLASHMLA_BACKEND_COMBINE_DEFINES=-DCOMBINE_SPLITS_IN_FLIGHT=8 ;;
  producer)  # the per-card KV producer rule against each producer forced, ours only (~1.5 min)
    run producer
    OUT=$ROOT_OUT/producer AB_TIMING_ONLY=1 timeout 300 bash benchmarks/ab_session.sh \
      shipped+FLASHMLA_BACKEND_KV_PRODUCER=tma shipped+FLASHMLA_BACKEND_KV_PRODUCER=cp_async \
      shipped+FLASHMLA_BACKEND_COMBINE_DEFINES=-DCOMBINE_SPLITS_IN_FLIGHT=1 ;;
  profile)
    run profile
    OUT=$ROOT_OUT/profile timeout 560 bash benchmarks/profile_ncu.sh ;;
  anatomy)
    run anatomy
    timeout 300 python benchmarks/latency_anatomy.py --out "$ROOT_OUT/anatomy" ;;
  *) echo "unknown experiment $experiment"; exit 2 ;;
  esac
done
