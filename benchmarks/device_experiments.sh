#!/usr/bin/env bash
# The open kernel questions of benchmarks/NOTES.md, on a one-GPU machine (pipeline, parts and
# overhead ran on an H200 on 2026-11-28: results/h200_run8/experiments/). Logs under
# $OUT/<experiment>/; each prints its table.
#   OUT=... benchmarks/device_experiments.sh [EXPERIMENT ...]   (default: verify)
#   pipeline: v1 without the math, 2 and 3 stages (is the KV ring the memory-row bound?)
#   parts:    memory rows with the scheduler capped at 128 parts (no splits, no combine work),
#             no-split rule off (FLASHMLA_BACKEND_NO_SPLIT_SLACK=0) so the cap alone differs
#   overhead: latency and varlen rows with the scheduler's per-split cost at 2, 5 (shipped),
#             10 and 20 pages (fewer, longer splits for small batches)
#   hold:     the pipeline diagnostic with each stage held 1.5 us (the math's hold time at
#             h_q = 16), 2 and 3 stages: is a held 2-stage ring latency-bound? And the same
#             pipeline loading by cp.async from 128 threads instead of TMA (~3 min)
#   pipeline_h100: what our load path alone sustains on the one-query-block rows (the memory rows,
#             MTP, mixed, b = 1): kernel_versions/mla_decode_diag_pipeline_only.cu (no math,
#             outputs zeros) by cp.async (2 and 3 stages) and by TMA beside the shipped decode,
#             alternated twice, ours only, no reference check (~2 min). Runs 8-9 measured it on an
#             H200 only; on the H100 it bounds what the memory rows can gain (NOTES.md
#             "What the 1.05x goal asks of each row (H100)")
#   hold_h100: the cp.async pipeline diagnostic with each stage held 0, 1.5 and 2.3 us (the
#             shipped decode's hold on the H100's memory row: ~4,500 cycles, run 20's page
#             anatomy) with 2 stages, and 2.3 us with 3, beside the shipped decode, one-query-block
#             rows, alternated twice, ours only (~2.5 min). Does the hold explain the 3.2% between
#             the shipped decode and its math-free pipeline (run 24), and would ring capacity
#             recover it?
#   load_levers: three questions about the load path of the one-query-block rows on the math-free
#             cp.async pipeline (diag_pipeline_only), alternated twice beside the shipped decode,
#             ours only, plus the memory row at b = 132 (every SM busy) (~4 min):
#             is the 3-stage ring's loss under a 2.3 us hold (run 25) the consumers' busy spin
#             (held by __nanosleep instead, 2 and 3 stages)? Does a page split between the
#             cp.async and TMA engines (5 or 8 chunks by cp.async) load faster per SM? Is the
#             pipeline bound per SM (b = 132 as fast as b = 128) or by DRAM (3% slower)?
#   read_ceiling: benchmarks/read_ceiling.py: how far above the copy rate a kernel that only reads
#             goes on this card (plain loads, 1-D bulk copies, whole cache pages by one bulk copy or
#             by the decode's nine TMA boxes, in order and shuffled, 2 and 3 stages; ~30 s): is the
#             copy rate the wall the 32k and MTP rows' 1.05x was said to need more than?
#   v40:      warps of warpgroup 0 with only padding rows skipping masking, softmax and P packing
#             (SKIP_PADDING_WARPS, shipped since run 33) against the softmax in every warp (=0):
#             reference check and GPU decode tests of =0, the h_q = 16 rows in bursts (alternated
#             twice, ours only) and back to back at the power cap with clocks (clock_probe.py
#             --rows memory, alternated twice), beside the TMA producer forced (~3 min on an H100)
#   empty_combine: benchmarks/empty_combine.py: the rows whose scheduler splits no request, timed
#             with and without the combine launch (it has nothing to merge there), alternated
#             three times, plus b = 132 (~1 min)
#   idle_combine: the combine's idle CTAs (no split request) exiting before their dependency wait,
#             CTA (0, 0) excepted (IDLE_CTAS_SKIP_WAIT, shipped since run 33) against every CTA
#             waiting (=0, the default before): reference check, the programmatic-launch and GPU
#             decode tests with the old setting; the diagnostic =2 (no CTA waits: run 33's copy
#             after the call still saw the whole output); empty_combine under each; then every
#             anchor row alternated twice, ours only (~3 min on an H100)
#   combine_ctas: requests per combine CTA by the rule (shipped: one wave of resident CTAs)
#             against 1 (the grid before run 26), 2 and 8 (FLASHMLA_BACKEND_COMBINE_REQUESTS_PER_CTA):
#             the grid's drain after the decode (empty_combine: 1-3 µs on the unsplit rows)
#             against the split rows' merge parallelism; the GPU decode and launch tests first,
#             then every anchor row alternated twice, ours only (~6 min)
#   producer_map: benchmarks/producer_map.py: our decode with each KV producer forced and by the
#             rule, h_q = 16 batches of 1-128 requests, s_k 512-32768, beside the scheduler
#             parts' page counts (~1.5 min)
#   host:     where an eager call's host time goes: host µs of the scheduler and decode calls and
#             a cProfile of the whole call, latency rows (benchmarks/host_profile.py; ~20 s)
#   pdl:      programmatic dependent launches (the default; decode behind the scheduler, combine
#             behind the decode) against plain ones (FLASHMLA_BACKEND_PDL=0): reference check of
#             the plain path, timing-only A/B (~2 min)
#   softmax:  v26's softmax knobs: 2 or 4 of every 8 exponentials by polynomial on the FMA
#             pipe, with a row's max kept until a page raises it by more than 8 (log2), and 2
#             without: reference checks, timing-only A/B (~4 min)
#   v28_split: the shipped softmax with 0, 1 and 3 of every 8 exponentials on the FMA pipe
#             instead of 2: does the split v26 chose still hold without the page max? (~2.5 min)
#   v29:      wgmma operand descriptors advanced by one add from a base (WGMMA_DESC_BY_OFFSET=1:
#             ~300 fewer uniform instructions per page in warpgroup 0): reference check and GPU
#             decode tests, a timing-only A/B, then back to back at the power cap
#             (clock_probe.py --rows compute) (~4 min; v30, Q's rope chunk from registers, ran
#             beside it in run 17 and was removed)
#   split_sustained: 2 of 8 exponentials on the FMA pipe (shipped) against none, back to back at
#             the power cap (clock_probe.py on the two 128-head rows, alternated twice): the split
#             was tuned in bursts, and a polynomial spends more energy than one ex2 (~2 min)
#   v31a:     the KV ring refilled by its consumers (no producer warpgroup; chunks 0-3 by warpgroup
#             0, 4-8 by warpgroup 1, each group with its own full barrier): the full A/B
#             (reference check, timing, four sanitizers, GPU unit tests) (~6 min)
#   small_schedule: the one-warp scheduler for batches of at most 32 requests against the
#             CTA-wide one (FLASHMLA_BACKEND_SMALL_SCHEDULE=0): the GPU scheduler tests, then the
#             latency rows' whole call and their anatomy, alternated twice (~2 min)
#   splits_early: the combine reading its split range after its dependency wait and the decode
#             releasing it after the wait (DEPENDENTS_AFTER_FIRST_ISSUE=0 with the combine's
#             SPLITS_BEFORE_WAIT=0, the defaults before run 20) against shipped: reference check,
#             programmatic-launch tests, the latency rows and whole call alternated three times
#             (~2.5 min)
#   ring_source: ncu's DRAM and L2 read bytes (and the tensor pipe, warp stalls) of the shipped
#             decode on 128,1,128 / 128,2,128 / the b = 8 row / 128,1,16: do the query-block
#             CTAs that read the same pages share them through L2 (DRAM bytes ~ the KV bytes
#             once), and how much L2-to-SM traffic is there (run 20's page wait) (~2 min)
#   trace:    the decode's phase trace (benchmarks/phase_trace.py, -DTRACE_PHASES=1): per event the
#             median and slowest CTA's time since the first CTA entered, latency rows (reused
#             schedule, then whole call) and the memory varlen row (~1.5 min)
#   pages:    the page anatomy (phase_trace.py --pages: scores, softmax, each warpgroup's P V and
#             the waits, in SM cycles) of 128,1,128, 128,2,128, the b = 8 row and 128,1,16,4096,
#             shipped (~1.5 min)
#   clocks:   SM clock, power and clock event reasons under seconds of back-to-back calls:
#             matmul, ours, and the peers if the vLLM bundle is installed (benchmarks/clock_probe.py; ~1-2 min)
#   sustained: the sustained table: every anchor row but the latency ones back to back, ours and
#             the peers if the vLLM bundle is installed, with clocks (clock_probe.py --rows
#             anchors; ~4 min with the peers)
#   verify:   the shipped decode (or VERIFY_VERSION): reference check with each KV producer
#             forced, the four sanitizers with the cp.async producer forced, GPU unit tests (~4 min)
#   combine:  the combine with 1, 4 (shipped) and 8 partial rows in flight per warp, ours only,
#             timing-only A/B (~1.5 min)
#   producer: the shipped per-card producer rule against TMA and cp.async forced, and the
#             combine at 1 row in flight, ours only, timing-only A/B (~2 min)
#   profile:  Nsight Compute counters (shared-memory wavefronts, L1, L2 sectors, DRAM, stalls)
#             of the shipped decode with each KV producer forced and the pipeline diagnostic
#             (TMA, cp.async), memory and compute row (~2 min)
#   peers_profile: the same counters for the shipped decode, FA3-MLA's and FlashMLA's on the
#             memory, 32k and 128-row compute problems (needs the vLLM bundle; ~3 min)
#   source:   per-instruction warp-stall samples (benchmarks/profile_source.sh) of the shipped
#             decode and FA3-MLA's on 128,1,128 and the 32k row: where each one's warps wait
#             (needs the vLLM bundle; ~4 min)
#   anatomy:  per-kernel GPU time and idle gaps of our call and the peers' on the latency rows
#             (benchmarks/latency_anatomy.py; needs the vLLM bundle for the peers; ~1 min)
#   bundle:   installs the vLLM bundle from /tmp/parts (the carried parts; ../shared/devkit) into
#             /tmp/vsite unless it is there (~20 s); later experiments of the call then see it
#   table:    the side-by-side table with the peers and test_backend_forward.py (needs the
#             bundle; ~2.5 min)
#   e2e1:     the end-to-end decode rate on one GPU (benchmarks/e2e_vllm.py): CUSTOM and FLASHMLA
#             one after the other, 128 requests of 4096 + 1024 tokens, E2E_REPEATS (3) repeats
#             each (~6 min on an H100; needs the bundle). The first engine of a call runs ~5%
#             faster (run 22), so run it twice in separate calls, the second with
#             E2E_ORDER="FLASHMLA CUSTOM", put each call's JSON under round0/ and round1/ of one
#             folder and pool them there with `e2e_vllm.py --report-only --rounds 2 --backends
#             CUSTOM FLASHMLA --out DIR`
#   e2e_producer: the end-to-end decode rate of CUSTOM under the per-card KV producer rule
#             against TMA forced (FLASHMLA_BACKEND_KV_PRODUCER=tma reaches vLLM's engine process
#             through the environment), one e2e_vllm.py run per setting, rule first,
#             E2E_REPEATS (3) repeats each, clocks sampled
#             (~7 min on an H100; needs the bundle). Run it twice in separate calls, the second
#             with E2E_REVERSE=1, so the first-engine advantage (run 22) falls on each setting
#             once: does TMA's 1-5% lead at the power cap (runs 33-34) show end to end?
#   e2e_split_query: the same for vLLM's query halves read in place by the decode (shipped since
#             the thirtieth session) against concatenated first (FLASHMLA_BACKEND_SPLIT_QUERY=0,
#             what vLLM's FlashMLA backend does): one concatenation kernel per layer and step less
#   v42:      the first GPU run of q as a (latent, rope) pair (~2 min, no bundle): the shipped
#             decode's reference check with each producer forced, tests/test_split_query.py and
#             the GPU decode tests that vary q's layout or the producer, then memcheck and
#             initcheck over sanitizer_cases.py (two of its cases pass q as tight halves)
#   v43:      query rows on the wgmma N dimension for at most 32 rows per KV head
#             (kernel_versions/mla_decode_v43_heads_on_n.cu; run on the CPU emulation only so far):
#             reference checks with each producer (--max-rows 32; if they fail, again with P^T by
#             single stores instead of stmatrix.trans, P_BY_STMATRIX=0), the row-limit and
#             FLASHMLA_BACKEND_FEW_ROWS_DECODE_FILE routing GPU tests, then the h_q = 16 rows
#             (memory, varlen, 32k, MTP, b = 1) and b = 132 alternated twice against the shipped
#             decode, v43 as is and with WGMMA_DESC_BY_OFFSET=1, ours only, then the memory rows
#             back to back at the power cap with clocks (clock_probe.py), TMA forced in both
#             (~6 min on an H100)
#   e2e_share: the same engines with 1-token prompts and 512 generated tokens (~4 min; needs the
#             bundle): the decode step with almost no attention, i.e. the rest of the step that
#             e2e1's step time minus it leaves to attention in the engine (NOTES, "Run 24")
#   whole_requests: the scheduler's whole-request rule (shipped on since run 30;
#             FLASHMLA_BACKEND_WHOLE_REQUESTS=0 turns it off): the GPU scheduler tests (kernel
#             against the Python mirror, rule on and off) and the decode tests under it, then ours
#             alone with the rule on (shipped) and off, alternated twice, on every anchor row plus
#             run 29's short contexts (64-1024 keys, fixed and varlen) (~1 min). Run 30 (H100):
#             varlen 64 27.2 -> 21.4 us, varlen 256 37.3 -> 34.4 us, anchor rows unchanged
#   short_contexts: the side-by-side table (ours and the peers, same process) at the contexts
#             e2e_share decodes: 128 requests, h_q = 16, s_q = 1, 64-1024 keys, fixed and varlen
#             (needs the bundle; ~1 min): is our 7-12% shorter step there the attention calls?
#   soak_pair: the serving soak on CUSTOM then FLASHMLA (SOAK_BACKENDS; SOAK_ROUNDS times, default 1; ~2 min
#             each; needs the bundle), each report kept (memory_steps_in_soak lists the requests
#             in flight at every step of the used memory): is run 29's step (CUSTOM 4 of 4, 156-232
#             MiB) ours or vLLM's, and which requests come with it? The allocator trace splits it
#             between torch's live tensors, its cached segments and the rest
#   engine_eager, engine_graphs, engine_mtp_server, engine_soak: one group of the engine-level
#             vLLM tests (integration_tests/README.md; needs the bundle; up to ~9 min each)
set -uo pipefail
[ -f /tmp/vsite/env.sh ] && . /tmp/vsite/env.sh  # the vLLM bundle, where a bundle call installed it
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=/tmp/cupy
ROOT_OUT=${OUT:-/tmp/out}
run() { mkdir -p "$ROOT_OUT/$1"; echo "=== $1"; }
# check_one EXPERIMENT LABEL VERSION [TEST_FILE...]: one version's reference check, then those
# test files under it (if any).
check_one() {
  local experiment=$1 label=$2 version=$3; shift 3
  . benchmarks/versions.sh
  with_version "$version" timeout 120 python benchmarks/check_decode_version.py --max-rows 512 \
    > "$ROOT_OUT/$experiment/$label.check" 2>&1
  echo "== $label correctness (rc $?): $(tail -1 "$ROOT_OUT/$experiment/$label.check")"
  [ $# -eq 0 ] && return
  with_version "$version" timeout 240 python -m pytest -q -p no:cacheprovider "$@" \
    > "$ROOT_OUT/$experiment/$label.tests" 2>&1
  echo "== $label tests ($*): $(tail -1 "$ROOT_OUT/$experiment/$label.tests")"
}
# check_variants EXPERIMENT VERSION...: each version's reference check and GPU decode tests.
check_variants() {
  local experiment=$1 version; shift
  for version in "$@"; do
    check_one "$experiment" "${version//[+=]/_}" "$version" tests/test_gpu_decode.py
  done
}
# checked_ok EXPERIMENT LABEL: check_one's reference check found nothing wrong and its tests (if
# any ran) all passed; else prints the first failures, so a broken variant's timing is skipped.
checked_ok() {
  local dir=$ROOT_OUT/$1 label=$2
  if tail -1 "$dir/$label.check" | grep -q '^0 failed' &&
     { [ ! -f "$dir/$label.tests" ] || ! tail -1 "$dir/$label.tests" | grep -qE 'failed|error|no tests'; }; then
    return 0
  fi
  echo "== $label is broken; its timing is skipped. First failures:"
  grep -m8 -E '^FAIL|Error|error' "$dir/$label.check" "$dir/$label.tests" 2>/dev/null
  return 1
}
# engine_tests NAME PYTEST_ARGS...: one group of the engine-level vLLM tests, on the tiny local
# DeepSeek (built once per machine).
engine_tests() {
  local name=$1; shift
  run "$name"
  [ -f /tmp/tiny-deepseek/config.json ] || python examples/make_tiny_deepseek.py /tmp/tiny-deepseek \
    > "$ROOT_OUT/$name/tiny_model.log" 2>&1
  FLASHMLA_TINY_DEEPSEEK_DIR=/tmp/tiny-deepseek VLLM_CACHE_ROOT=/tmp/vllm-cache timeout 540 \
    python -m pytest -q -ra -x -p no:cacheprovider "$@" > "$ROOT_OUT/$name/pytest.log" 2>&1
  echo "$name: $(tail -1 "$ROOT_OUT/$name/pytest.log")"
}
# alternated_ab EXPERIMENT ROUNDS ROWS VERSION...: shipped and each version alternated ROUNDS
# times, ours only (bench --no-peers --no-check: run the reference check before, with check_one),
# on the bench rows matching ROWS ("" for every anchor row) and the extra rows AB_CASES (bench
# --case, space-separated); one line per run with each row's time.
alternated_ab() {
  local experiment=$1 rounds=$2 rows=$3 round v label case; shift 3
  local -a row_args=()
  [ -n "$rows" ] && row_args=(--rows "$rows")
  for case in ${AB_CASES:-}; do row_args+=(--case "$case"); done
  . benchmarks/versions.sh
  for round in $(seq "$rounds"); do
    local -a versions=(shipped "$@")
    [ -n "${AB_SKIP_SHIPPED:-}" ] && versions=("$@")  # the versions given already hold the baseline
    for v in "${versions[@]}"; do
      label=${v//[+=]/_}_round$round
      with_version "$v" timeout 150 python -m flashmla_backend.bench --no-peers --no-plots --no-check \
        "${row_args[@]}" --out "$ROOT_OUT/$experiment/$label" > "$ROOT_OUT/$experiment/$label.md" 2>&1
      echo "$label: $(grep -E '^\| (memory|mixed|compute|latency)|^Whole' "$ROOT_OUT/$experiment/$label.md" \
        | cut -d'|' -f2,3 | tr '\n' ' ')"
    done
  done
}
# e2e_variants EXPERIMENT VARIANT...: CUSTOM end to end (e2e_vllm.py, E2E_REPEATS repeats, 3 by
# default) once per VARIANT, in the order given (reversed with E2E_REVERSE=1), clocks sampled;
# a VARIANT is LABEL or LABEL:VARIABLE=VALUE (exported to vLLM's processes for that run only).
e2e_variants() {
  local experiment=$1 variant label assignment; shift
  run "$experiment"
  local call_dir=$ROOT_OUT/$experiment/$(date +%H%M%S) sampler
  local -a variants=("$@")
  [ -n "${E2E_REVERSE:-}" ] && variants=($(printf '%s\n' "$@" | tac))
  mkdir -p "$call_dir"
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv,noheader -lms 500 > "$call_dir/smi.csv" 2>/dev/null &
  sampler=$!
  for variant in "${variants[@]}"; do
    label=${variant%%:*}
    assignment=; [ "$variant" != "$label" ] && assignment=${variant#*:}
    env ${assignment:+"$assignment"} timeout 290 python benchmarks/e2e_vllm.py --backends CUSTOM --timeout 280 \
      --repeats "${E2E_REPEATS:-3}" --out "$call_dir/$label" > "$call_dir/$label.log" 2>&1
    echo "$label: $(grep -E 'CUSTOM: [0-9]+ decode tok/s' "$call_dir/$label.log" | tail -1)"
  done
  kill $sampler 2>/dev/null
}
for experiment in ${@:-verify}; do
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
  pipeline_h100)  # the math-free pipeline against the shipped decode, one-query-block rows
    run pipeline_h100
    alternated_ab pipeline_h100 2 ", 16,|, 1, 64," mla_decode_diag_pipeline_only+DIAG_CP_ASYNC=1 \
      mla_decode_diag_pipeline_only+DIAG_CP_ASYNC=1+DIAG_STAGES=3 mla_decode_diag_pipeline_only ;;
  hold_h100)  # is the shipped decode's 3.2% over its pipeline the stage hold? (H100, cp.async)
    run hold_h100
    diag=mla_decode_diag_pipeline_only+DIAG_CP_ASYNC=1
    alternated_ab hold_h100 2 ", 16,|, 1, 64," $diag $diag+DIAG_HOLD_NS=1500 $diag+DIAG_HOLD_NS=2300 \
      $diag+DIAG_STAGES=3+DIAG_HOLD_NS=2300 ;;
  load_levers)  # hold by sleep, both load engines, b = 132 (H100, cp.async pipeline)
    run load_levers
    diag=mla_decode_diag_pipeline_only
    AB_CASES="memory:132,1,16,4096" alternated_ab load_levers 2 ", 16,|, 1, 64," $diag+DIAG_CP_ASYNC=1 \
      $diag+DIAG_CP_ASYNC=1+DIAG_HOLD_NS=2300+DIAG_HOLD_SLEEP=1 \
      $diag+DIAG_CP_ASYNC=1+DIAG_STAGES=3+DIAG_HOLD_NS=2300+DIAG_HOLD_SLEEP=1 \
      $diag+DIAG_CP_ASYNC=1+DIAG_STAGES=3+DIAG_HOLD_NS=2300 $diag+DIAG_CP_CHUNKS=5 $diag+DIAG_CP_CHUNKS=8 ;;
  empty_combine)  # what the combine costs where it has nothing to merge
    run empty_combine
    timeout 200 python benchmarks/empty_combine.py --case memory:132,1,16,4096 \
      > "$ROOT_OUT/empty_combine/empty_combine.md" 2>&1
    cat "$ROOT_OUT/empty_combine/empty_combine.md" ;;
  idle_combine)  # idle combine CTAs skip the dependency wait (shipped) against all waiting
    run idle_combine
    knob=shipped+FLASHMLA_BACKEND_COMBINE_DEFINES=-DIDLE_CTAS_SKIP_WAIT=0
    check_one idle_combine every_cta_waits $knob tests/test_programmatic_launch.py tests/test_gpu_decode.py
    # Diagnostic: no CTA waits at all; does a plain launch after the call still see the whole output?
    FLASHMLA_BACKEND_COMBINE_DEFINES=-DIDLE_CTAS_SKIP_WAIT=2 timeout 120 python -c "
import sys; sys.path.insert(0, 'tests')
from test_programmatic_launch import ORDERING_SHAPES, output_seen_by_next_kernel
for shape in ORDERING_SHAPES:
    print('no CTA waits', [len(shape[0]), shape[1], shape[2]], 'relative error seen by the next kernel:',
          output_seen_by_next_kernel(*shape)[0])
" > "$ROOT_OUT/idle_combine/no_cta_waits.log" 2>&1
    tail -3 "$ROOT_OUT/idle_combine/no_cta_waits.log"
    if checked_ok idle_combine every_cta_waits; then
      . benchmarks/versions.sh
      for version in shipped $knob; do
        label=${version//[+=-]/_}
        with_version "$version" timeout 200 python benchmarks/empty_combine.py --case memory:132,1,16,4096 \
          > "$ROOT_OUT/idle_combine/empty_combine_$label.md" 2>&1
        echo "empty_combine $version:"; tail -8 "$ROOT_OUT/idle_combine/empty_combine_$label.md"
      done
      alternated_ab idle_combine 2 "" $knob
    fi ;;
  combine_ctas)  # requests per combine CTA
    run combine_ctas
    timeout 300 python -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py tests/test_launch.py ${COMBINE_CTAS_TESTS:+-k "$COMBINE_CTAS_TESTS"} \
      > "$ROOT_OUT/combine_ctas/gpu_decode.tests" 2>&1
    echo "GPU decode and launch tests: $(tail -1 "$ROOT_OUT/combine_ctas/gpu_decode.tests")"
    k=shipped+FLASHMLA_BACKEND_COMBINE_REQUESTS_PER_CTA
    alternated_ab combine_ctas 2 "" $k=1 ${COMBINE_CTAS_MORE:+$k=2 $k=8} ;;
  producer_map)  # TMA, cp.async and the rule against pages per scheduler part (~1.5 min)
    run producer_map
    timeout 200 python benchmarks/producer_map.py --out "$ROOT_OUT/producer_map/producer_map.md" > /dev/null 2>&1
    cat "$ROOT_OUT/producer_map/producer_map.md" ;;
  host)
    run host
    timeout 120 python benchmarks/host_profile.py > "$ROOT_OUT/host/host_profile.log" 2>&1
    grep -E "^##|tottime" -A12 "$ROOT_OUT/host/host_profile.log" | head -60 ;;
  pdl)
    run pdl
    FLASHMLA_BACKEND_PDL=0 timeout 120 python benchmarks/check_decode_version.py --max-rows 512 \
      > "$ROOT_OUT/pdl/check_plain.log" 2>&1
    echo "== shipped without PDL, correctness (rc $?): $(tail -1 "$ROOT_OUT/pdl/check_plain.log")"
    OUT=$ROOT_OUT/pdl AB_TIMING_ONLY=1 timeout 300 bash benchmarks/ab_session.sh \
      shipped+FLASHMLA_BACKEND_PDL=0 ;;
  softmax)
    run softmax
    variants="shipped+RESCALE_THRESHOLD_LOG2=8.f+EXP2_ON_FMA_PER_8=2
      shipped+RESCALE_THRESHOLD_LOG2=8.f+EXP2_ON_FMA_PER_8=4 shipped+EXP2_ON_FMA_PER_8=2"
    . benchmarks/versions.sh
    for version in $variants; do
      with_version "$version" timeout 120 python benchmarks/check_decode_version.py --max-rows 512 \
        > "$ROOT_OUT/softmax/${version//[+=]/_}.check" 2>&1
      echo "== $version correctness (rc $?): $(tail -1 "$ROOT_OUT/softmax/${version//[+=]/_}.check")"
    done
    OUT=$ROOT_OUT/softmax AB_TIMING_ONLY=1 timeout 400 bash benchmarks/ab_session.sh $variants ;;
  v28_split)
    run v28_split
    OUT=$ROOT_OUT/v28_split AB_TIMING_ONLY=1 timeout 400 bash benchmarks/ab_session.sh \
      shipped+EXP2_ON_FMA_PER_8=1 shipped+EXP2_ON_FMA_PER_8=3 shipped+EXP2_ON_FMA_PER_8=0 ;;
  v29)
    run v29
    variants="shipped+WGMMA_DESC_BY_OFFSET=1"
    check_variants v29 $variants
    OUT=$ROOT_OUT/v29 AB_TIMING_ONLY=1 timeout 400 bash benchmarks/ab_session.sh $variants
    . benchmarks/versions.sh
    for version in shipped $variants; do
      label=${version//[+=]/_}
      with_version "$version" timeout 60 python benchmarks/clock_probe.py --rows compute --seconds 3 \
        --out "$ROOT_OUT/v29/sustained_$label" > "$ROOT_OUT/v29/sustained_$label.log" 2>&1
      echo "sustained $version: $(grep '^| ours' "$ROOT_OUT/v29/sustained_$label.log" | tail -2 | cut -d'|' -f4,5 | tr '\n' ' ')"
    done ;;
  v40)  # padding warps skip the softmax (shipped) against =0: checks, bursts, back to back (~3 min)
    run v40
    variant=shipped+SKIP_PADDING_WARPS=0
    check_variants v40 $variant
    if checked_ok v40 "${variant//[+=]/_}"; then
      alternated_ab v40 2 ", 16, " $variant
      . benchmarks/versions.sh
      for round in 1 2; do
        # The TMA producer too: one issuing thread instead of 128 may pay back at the cap.
        for version in shipped $variant shipped+FLASHMLA_BACKEND_KV_PRODUCER=tma; do
          label=${version//[+=]/_}_sustained$round
          with_version "$version" timeout 120 python benchmarks/clock_probe.py --rows memory --seconds 3 \
            --out "$ROOT_OUT/v40/$label" > "$ROOT_OUT/v40/$label.log" 2>&1
          echo "$label: $(sed -n '/^## Sustained/,$p' "$ROOT_OUT/v40/$label.log" | grep '^| [0-9]' | cut -d'|' -f2,3 | tr '\n' ' ')"
          grep '^| ours' "$ROOT_OUT/v40/$label/clocks.md" 2>/dev/null | cut -d'|' -f2,5,7 | head -4
        done
      done
    fi ;;
  split_sustained)
    run split_sustained
    . benchmarks/versions.sh
    for round in 1 2; do
      for version in shipped shipped+EXP2_ON_FMA_PER_8=0; do
        label=${version//[+=]/_}_round$round
        with_version "$version" timeout 90 python benchmarks/clock_probe.py --rows 128x1x128x4096 \
          128x2x128x4096 --seconds 3 --out "$ROOT_OUT/split_sustained/$label" \
          > "$ROOT_OUT/split_sustained/$label.log" 2>&1
        echo "$version round $round: $(sed -n '/^## Sustained/,$p' "$ROOT_OUT/split_sustained/$label.log" | grep '^| 128' | cut -d'|' -f2,3 | tr '\n' ' ')"
      done
    done ;;
  v31a)
    run v31a
    OUT=$ROOT_OUT/v31a timeout 580 bash benchmarks/ab_session.sh mla_decode_v31a_consumer_refills ;;
  small_schedule)
    run small_schedule
    timeout 200 python -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py -k "schedule" \
      > "$ROOT_OUT/small_schedule/tests.log" 2>&1
    echo "GPU scheduler tests: $(tail -1 "$ROOT_OUT/small_schedule/tests.log")"
    for round in 1 2; do
      for small in 1 0; do
        label=small${small}_round$round
        FLASHMLA_BACKEND_SMALL_SCHEDULE=$small timeout 120 python -m flashmla_backend.bench --no-peers --no-plots \
          --rows latency --out "$ROOT_OUT/small_schedule/$label" > "$ROOT_OUT/small_schedule/$label.md" 2>&1
        echo "$label: $(grep -E "^Whole" "$ROOT_OUT/small_schedule/$label.md")"
        FLASHMLA_BACKEND_SMALL_SCHEDULE=$small timeout 120 python benchmarks/latency_anatomy.py \
          --out "$ROOT_OUT/small_schedule/anatomy_$label" > "$ROOT_OUT/small_schedule/anatomy_$label.log" 2>&1
        grep "ours+schedule" "$ROOT_OUT/small_schedule/anatomy_$label.log"
      done
    done ;;
  splits_early)
    run splits_early
    . benchmarks/versions.sh
    knobs=shipped+DEPENDENTS_AFTER_FIRST_ISSUE=0+FLASHMLA_BACKEND_COMBINE_DEFINES=-DSPLITS_BEFORE_WAIT=0
    check_one splits_early late $knobs tests/test_programmatic_launch.py
    checked_ok splits_early late && alternated_ab splits_early 3 latency $knobs ;;
  trace)
    run trace
    . benchmarks/versions.sh
    trace_rows() {  # LABEL VERSION ARGS...
      local label=$1 version=$2; shift 2
      with_version "$version" timeout 150 python benchmarks/phase_trace.py "$@" --out "$ROOT_OUT/trace/$label" \
        > "$ROOT_OUT/trace/$label.log" 2>&1
      echo "== $label ($version)"; cat "$ROOT_OUT/trace/$label.log"
    }
    trace_rows latency shipped --rows latency
    trace_rows latency_whole_call shipped --rows latency --whole-call
    trace_rows memory_varlen shipped --rows "varlen 4096" ;;
  pages)
    run pages
    . benchmarks/versions.sh
    for row in "128, 1, 128" "128, 2, 128, 4096" "8, 1, 128, 2048" "128, 1, 16, 4096"; do
      label=${row//, /x}
      timeout 150 python benchmarks/phase_trace.py --pages --rows "$row" --out "$ROOT_OUT/pages/$label" \
        > "$ROOT_OUT/pages/$label.log" 2>&1
      echo "== $row"; sed -n '/page anatomy/,$p' "$ROOT_OUT/pages/$label.log"
    done ;;
  clocks)
    run clocks
    timeout 200 python benchmarks/clock_probe.py --out "$ROOT_OUT/clocks" > "$ROOT_OUT/clocks/probe.log" 2>&1
    tail -14 "$ROOT_OUT/clocks/probe.log" ;;
  sustained)
    run sustained
    timeout 500 python benchmarks/clock_probe.py --rows anchors --seconds 3 --out "$ROOT_OUT/sustained" \
      > "$ROOT_OUT/sustained/probe.log" 2>&1
    sed -n '/^## Sustained/,$p' "$ROOT_OUT/sustained/probe.log" ;;
  verify)  # VERIFY_VERSION (default shipped): the version whose knobs every step runs with
    run verify
    . benchmarks/versions.sh
    version=${VERIFY_VERSION:-shipped}
    echo "version: $version"
    for producer in tma cp_async; do
      with_version "$version" env FLASHMLA_BACKEND_KV_PRODUCER=$producer timeout 120 \
        python benchmarks/check_decode_version.py --max-rows 512 > "$ROOT_OUT/verify/check_$producer.log" 2>&1
      echo "== $version, $producer producer, correctness (rc $?): $(tail -1 "$ROOT_OUT/verify/check_$producer.log")"
    done
    with_version "$version" env FLASHMLA_BACKEND_KV_PRODUCER=cp_async OUT=$ROOT_OUT/verify bash benchmarks/run_sanitizers.sh
    with_version "$version" timeout 240 python -m pytest -q -p no:cacheprovider tests > "$ROOT_OUT/verify/unit_tests.log" 2>&1
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
  ring_source)  # DRAM and L2 read bytes of the shipped decode on the 128-head rows (~2 min)
    run ring_source
    NCU_SHAPES="128 1 128 4096,128 2 128 4096,8 1 128 2048,128 1 16 4096" OUT=$ROOT_OUT/ring_source \
      timeout 400 bash benchmarks/profile_ncu.sh --shipped-only ;;
  peers_profile)  # needs the vLLM bundle
    run peers_profile
    NCU_SHAPES="128 1 16 4096,32 1 16 32768,128 1 128 4096" OUT=$ROOT_OUT/peers_profile timeout 560 \
      bash benchmarks/profile_ncu.sh peer:FA3-MLA peer:FlashMLA ;;
  source)  # needs the vLLM bundle for the FA3-MLA half
    run source
    for version in shipped peer:FA3-MLA; do
      OUT=$ROOT_OUT/source timeout 280 bash benchmarks/profile_source.sh $version "128 1 128 4096" "32 1 16 32768"
    done ;;
  read_ceiling)  # the card's read-only rate by loads, bulk copies, cache pages and the decode's TMA boxes (~30 s)
    run read_ceiling
    timeout 150 python benchmarks/read_ceiling.py > "$ROOT_OUT/read_ceiling/read_ceiling.md" 2>&1
    tail -26 "$ROOT_OUT/read_ceiling/read_ceiling.md" ;;
  anatomy)
    run anatomy
    timeout 300 python benchmarks/latency_anatomy.py --out "$ROOT_OUT/anatomy" ;;
  bundle)
    run bundle
    if [ ! -f /tmp/vsite/env.sh ]; then
      (cd /tmp/parts && sh install.sh /tmp/vsite) > "$ROOT_OUT/bundle/install.log" 2>&1
      tail -2 "$ROOT_OUT/bundle/install.log"
    fi
    . /tmp/vsite/env.sh
    export PYTHONPATH=$PWD:$PYTHONPATH ;;
  table)
    run table
    timeout 240 python -m flashmla_backend.bench --out "$ROOT_OUT/table" > "$ROOT_OUT/table/table.md" 2>&1
    tail -16 "$ROOT_OUT/table/table.md"
    timeout 150 python -m pytest -q -p no:cacheprovider integration_tests/test_backend_forward.py \
      > "$ROOT_OUT/table/backend_forward.log" 2>&1
    echo "test_backend_forward.py: $(tail -1 "$ROOT_OUT/table/backend_forward.log")" ;;
  e2e1)
    run e2e1
    # Clocks beside the repeats (e2e_vllm.py logs each repeat's wall-clock start).
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
      --format=csv,noheader -lms 500 > "$ROOT_OUT/e2e1/smi.csv" 2>/dev/null &
    sampler=$!
    timeout 570 python benchmarks/e2e_vllm.py --backends ${E2E_ORDER:-CUSTOM FLASHMLA} --timeout 280 \
      --repeats "${E2E_REPEATS:-3}" --out "$ROOT_OUT/e2e1" > "$ROOT_OUT/e2e1/e2e.log" 2>&1
    kill $sampler 2>/dev/null
    tail -8 "$ROOT_OUT/e2e1/e2e.log" ;;
  v42)  # q pair read in place: checks, GPU tests, memcheck + initcheck (~2 min)
    run v42
    for producer in tma cp_async; do
      FLASHMLA_BACKEND_KV_PRODUCER=$producer timeout 120 python benchmarks/check_decode_version.py --max-rows 512 \
        > "$ROOT_OUT/v42/check_$producer.log" 2>&1
      echo "== $producer producer, correctness (rc $?): $(tail -1 "$ROOT_OUT/v42/check_$producer.log")"
    done
    timeout 300 python -m pytest -q -p no:cacheprovider tests/test_split_query.py tests/test_gpu_decode.py \
      -k "split_query or pair or noncontiguous or both_kv_producers or graph" > "$ROOT_OUT/v42/tests.log" 2>&1
    echo "GPU tests: $(tail -1 "$ROOT_OUT/v42/tests.log")"
    SANITIZER_TOOLS="memcheck initcheck" OUT=$ROOT_OUT/v42 bash benchmarks/run_sanitizers.sh ;;
  v43)  # heads on N for <= 32 rows: checks, then bursts and the power cap against shipped (~6 min)
    run v43
    . benchmarks/versions.sh
    v43=mla_decode_v43_heads_on_n
    for variant in $v43 $v43+P_BY_STMATRIX=0; do  # the second only if the first is off
      for producer in tma cp_async; do
        label=${variant//[+=]/_}_$producer
        FLASHMLA_BACKEND_KV_PRODUCER=$producer with_version $variant timeout 120 \
          python benchmarks/check_decode_version.py --max-rows 32 > "$ROOT_OUT/v43/$label.check" 2>&1
        echo "== $variant, $producer producer, correctness (rc $?): $(tail -1 "$ROOT_OUT/v43/$label.check")"
      done
      label=${variant//[+=]/_}
      if checked_ok v43 ${label}_tma && checked_ok v43 ${label}_cp_async; then v43=$variant; break; fi
      v43=""
    done
    timeout 200 python -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py -k "row_limit or few_rows" \
      > "$ROOT_OUT/v43/routing.log" 2>&1
    echo "row-limit and few-rows routing tests: $(tail -1 "$ROOT_OUT/v43/routing.log")"
    if [ -n "$v43" ]; then
      # With the descriptors advanced by an add (v29's knob): 3 instructions between v43's wgmmas, not 12.
      AB_CASES="memory:132,1,16,4096" alternated_ab v43 2 ", 16, " $v43 $v43+WGMMA_DESC_BY_OFFSET=1
      for round in 1 2; do  # back to back at the cap, TMA in both (the sustained regime's producer)
        for version in shipped $v43; do
          label=${version//[+=]/_}_sustained$round
          FLASHMLA_BACKEND_KV_PRODUCER=tma with_version "$version" timeout 150 python benchmarks/clock_probe.py \
            --rows 128x1x16x4096 128x1x16x4096v 32x1x16x32768 128x2x16x8192 --seconds 3 \
            --out "$ROOT_OUT/v43/$label" > "$ROOT_OUT/v43/$label.log" 2>&1
          echo "$label: $(sed -n '/^## Sustained/,$p' "$ROOT_OUT/v43/$label.log" | grep '^| [0-9]' | cut -d'|' -f2,3 | tr '\n' ' ')"
        done
      done
    fi ;;
  e2e_producer)
    e2e_variants e2e_producer rule tma:FLASHMLA_BACKEND_KV_PRODUCER=tma ;;
  e2e_split_query)
    e2e_variants e2e_split_query split concat:FLASHMLA_BACKEND_SPLIT_QUERY=0 ;;
  e2e_share)
    run e2e_share
    timeout 500 python benchmarks/e2e_vllm.py --backends ${E2E_ORDER:-FLASHMLA CUSTOM} --timeout 240 \
      --prompt-len 1 --gen-len 512 --repeats 5 --out "$ROOT_OUT/e2e_share" > "$ROOT_OUT/e2e_share/e2e.log" 2>&1
    tail -8 "$ROOT_OUT/e2e_share/e2e.log" ;;
  whole_requests)
    run whole_requests
    timeout 300 python -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py \
      -k "schedule_matches_python_mirror or whole_request" > "$ROOT_OUT/whole_requests/gpu.tests" 2>&1
    echo "GPU scheduler and whole-request decode tests: $(tail -1 "$ROOT_OUT/whole_requests/gpu.tests")"
    cases=""
    for sk in 64 256 1024; do cases="$cases memory:128,1,16,$sk memory:128,1,16,$sk,varlen"; done
    AB_CASES=$cases alternated_ab whole_requests 2 "" shipped+FLASHMLA_BACKEND_WHOLE_REQUESTS=0 ;;
  short_contexts)
    run short_contexts
    cases=""
    for sk in 64 256 512 1024; do cases="$cases --case memory:128,1,16,$sk --case memory:128,1,16,$sk,varlen"; done
    timeout 240 python -m flashmla_backend.bench --rows NO_ANCHOR_ROWS --no-plots $cases \
      --out "$ROOT_OUT/short_contexts" > "$ROOT_OUT/short_contexts/table.md" 2>&1
    tail -12 "$ROOT_OUT/short_contexts/table.md" ;;
  soak_pair)
    run soak_pair
    [ -f /tmp/tiny-deepseek/config.json ] || python examples/make_tiny_deepseek.py /tmp/tiny-deepseek \
      > "$ROOT_OUT/soak_pair/tiny_model.log" 2>&1
    for round in $(seq "${SOAK_ROUNDS:-1}"); do
      for backend in ${SOAK_BACKENDS:-CUSTOM FLASHMLA}; do
        label=${backend}_round$round
        FLASHMLA_SOAK_BACKEND=$backend FLASHMLA_SOAK_REPORT=$ROOT_OUT/soak_pair/$label.json \
          FLASHMLA_TINY_DEEPSEEK_DIR=/tmp/tiny-deepseek VLLM_CACHE_ROOT=/tmp/vllm-cache timeout 280 \
          python -m pytest -q -p no:cacheprovider integration_tests/test_serving_soak.py \
          > "$ROOT_OUT/soak_pair/$label.log" 2>&1
        echo "$label: $(tail -1 "$ROOT_OUT/soak_pair/$label.log")"
        python - "$ROOT_OUT/soak_pair/$label.json" <<'PY'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(0)
print("  memory", report["memory_mib"])
for step in report.get("memory_steps_in_soak", []):
    print("  step", step["t_s"], step["mib"], step["in_flight"])
allocator = report.get("allocator", {})
lists = ("reserved_steps", "reserved_changes_by_step")
print("  allocator", {k: v for k, v in allocator.items() if k not in lists})
for step in allocator.get("reserved_steps", []):
    print("  reserved step (by sample)", step)
for step in allocator.get("reserved_changes_by_step", []):
    print("  reserved step (by engine step)", step)
PY
      done
    done ;;
  engine_eager) engine_tests engine_eager integration_tests/test_offline_parity.py -k eager ;;
  engine_graphs) engine_tests engine_graphs integration_tests/test_offline_parity.py -k "not eager" ;;
  engine_mtp_server) engine_tests engine_mtp_server integration_tests/test_mtp_speculative.py \
    integration_tests/test_openai_server.py ;;
  engine_soak) engine_tests engine_soak integration_tests/test_serving_soak.py \
    integration_tests/test_prefix_cache_preemption.py ;;
  *) echo "unknown experiment $experiment"; exit 2 ;;
  esac
done
