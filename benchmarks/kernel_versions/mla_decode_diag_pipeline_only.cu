// DIAGNOSTIC (not a decode; outputs are zeros; NOTES.md "Memory-pipeline ceiling"): v1's
// producer, KV ring, scheduler pieces and output stores with the math taken out, to measure
// what the memory pipeline alone sustains. KV_STAGES comes from -DDIAG_STAGES (default 2, as
// v1; 3 fits because this version keeps no Q or P tile in shared memory). -DDIAG_HOLD_NS=N
// makes the consumers hold each stage N ns before releasing it, standing in for the math's
// hold time (is a 2-stage ring latency-bound once the stages are held?). -DDIAG_CP_ASYNC=1
// loads the pages with 16-byte cp.async from all 128 producer threads instead of one thread's
// TMA boxes (FA3's MLA decode does so when a sequence has <= 64 query rows; its source says
// TMA was slower there). -DDIAG_HOLD_SLEEP=1 holds by __nanosleep instead of a busy spin, so
// the waiting consumer warps leave the issue slots to the producer. -DDIAG_CP_CHUNKS=N (1-8)
// loads chunks [0, N) of each page by cp.async and the rest by TMA boxes on the same full
// barrier: two load engines per SM at once. Timed with benchmarks/ab_session.sh, e.g.
// mla_decode_diag_pipeline_only+DIAG_STAGES=3.
// Split-KV MLA decode for Hopper (sm_90a): one CTA per (64-row query block, KV head,
// scheduler part). The part's share of (request, page range) pieces comes from
// tile_scheduler_metadata.
//
// Warpgroup roles (384 threads; setmaxnreg moves registers from the producer to the math):
//   warpgroup 0 (softmax): S = Q K^T with wgmma, masking, online softmax, P to smem,
//                          O[:, 0:256] += P V                                   240 regs
//   warpgroup 1 (PV):      O[:, 256:512] += P V, overlapping warpgroup 0's next S  224 regs
//   warpgroup 2 (producer): one thread streams 64-token pages by TMA into a two-stage
//                          ring guarded by full/empty mbarriers                   40 regs
// Q (64 x 576) stays in smem for a whole piece. V is the first 512 columns of the K tile,
// read MN-major by the P V wgmma straight from the same swizzled buffer.
#include "mla_decode_shared.cuh"

#ifndef DIAG_STAGES
#define DIAG_STAGES 2
#endif
#ifndef DIAG_HOLD_NS
#define DIAG_HOLD_NS 0
#endif
#ifndef DIAG_CP_ASYNC
#define DIAG_CP_ASYNC 0
#endif
#ifndef DIAG_HOLD_SLEEP
#define DIAG_HOLD_SLEEP 0
#endif
#ifndef DIAG_CP_CHUNKS
#define DIAG_CP_CHUNKS 0
#endif
// The API passes the cache pointer and strides to sources that declare this (a literal).
constexpr bool TAKES_KV_POINTER = true;
constexpr bool LOAD_BY_CP_ASYNC = DIAG_CP_ASYNC != 0;
constexpr int KV_STAGES = DIAG_STAGES;
constexpr long long HOLD_NS = DIAG_HOLD_NS;
constexpr int MIXED_CP_CHUNKS = DIAG_CP_CHUNKS;  // 0: one engine only
static_assert(MIXED_CP_CHUNKS >= 0 && MIXED_CP_CHUNKS < QK_CHUNKS, "DIAG_CP_CHUNKS: 0 to 8");
static_assert(!(LOAD_BY_CP_ASYNC && MIXED_CP_CHUNKS), "DIAG_CP_ASYNC and DIAG_CP_CHUNKS exclude each other");

constexpr int SOFTMAX_WG_REGS = 240;
constexpr int PV_WG_REGS = 224;
constexpr int PRODUCER_WG_REGS = 40;
static_assert(WG_THREADS * (SOFTMAX_WG_REGS + PV_WG_REGS + PRODUCER_WG_REGS) <=
                  DECODE_THREADS * LAUNCH_REGS_PER_THREAD,
              "register split exceeds the registers the CTA is launched with");


// Shared memory map (byte offsets from a 1024-aligned base).
constexpr int SMEM_KV = 0;
constexpr int SMEM_BARRIERS = SMEM_KV + KV_STAGES * TILE_BYTES;
constexpr int SMEM_USED = SMEM_BARRIERS + 2 * KV_STAGES * 8;
constexpr int SMEM_ALIGN = 1024;
constexpr int DECODE_SMEM_BYTES = SMEM_USED + SMEM_ALIGN;  // slack to align the base
static_assert(DECODE_SMEM_BYTES <= 227 * 1024, "decode tile does not fit in shared memory");
#ifdef MLA_LAUNCH_SMEM_BYTES  // what the API reserves (flashmla_backend._constants)
static_assert(DECODE_SMEM_BYTES <= MLA_LAUNCH_SMEM_BYTES, "the launch reserves less shared memory than this map needs");
#endif

struct SharedTiles {
    uint8_t* base;
    DEVICE uint8_t* kv(int stage) const { return base + SMEM_KV + stage * TILE_BYTES; }
    DEVICE uint64_t* full_bar() const { return reinterpret_cast<uint64_t*>(base + SMEM_BARRIERS); }
    DEVICE uint64_t* empty_bar() const { return full_bar() + KV_STAGES; }
};

DEVICE void setmaxnreg_inc_240() { asm volatile("setmaxnreg.inc.sync.aligned.u32 240;"); }
DEVICE void setmaxnreg_inc_224() { asm volatile("setmaxnreg.inc.sync.aligned.u32 224;"); }
DEVICE void setmaxnreg_dec_40() { asm volatile("setmaxnreg.dec.sync.aligned.u32 40;"); }

// Chunks [first_chunk, 9) of one page into a stage by TMA boxes, completing on its full barrier.
DEVICE void load_chunks_tma(const DecodeArgs& a, const SharedTiles& sm, int stage, int page_id, int first_chunk,
                            uint64_t policy) {
    for (int c = first_chunk; c < QK_CHUNKS; ++c)
        tma_load_4d(sm.kv(stage) + c * CHUNK_BYTES, a.kv_map, &sm.full_bar()[stage], c * CHUNK_COLS, a.kh, 0,
                    page_id, policy);
}

// Every page of the part's pieces in ring order: waits until the page's stage is free, then
// load_page(stage, page_id) fills it and arrives on its full barrier.
template <typename LoadPage>
DEVICE void for_each_ring_page(const DecodeArgs& a, const SharedTiles& sm, LoadPage load_page) {
    int it = 0;
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        const int* pages = a.block_table + (size_t)req * a.bt_stride;
        for (int page = piece.page_begin; page < piece.page_end; ++page, ++it) {
            const int stage = it % KV_STAGES;
            mbarrier_wait(&sm.empty_bar()[stage], ((it / KV_STAGES) & 1) ^ 1);
            load_page(stage, pages[page]);
        }
    }
}

// Producer: one thread streams every page through the KV ring by TMA boxes.
DEVICE void run_producer(const DecodeArgs& a, const SharedTiles& sm) {
    // One query block streams each page once; several blocks re-read it from L2.
    const uint64_t policy = a.kv_evict_first ? l2_policy_evict_first() : l2_policy_evict_last();
    for_each_ring_page(a, sm, [&](int stage, int page_id) {
        mbarrier_arrive_expect_tx(&sm.full_bar()[stage], TILE_BYTES);
        load_chunks_tma(a, sm, stage, page_id, 0, policy);
    });
}

// Producer warpgroup, cp.async flavour: all 128 threads copy each page into the same
// 128B-swizzled chunks TMA would write; consecutive threads read consecutive 16-byte vectors.
DEVICE void run_producer_cp_async(const DecodeArgs& a, const SharedTiles& sm, const uint16_t* k_cache,
                                  long long page_stride, long long token_stride, int tid) {
    for_each_ring_page(a, sm, [&](int stage, int page_id) {
        copy_page_cp_async(sm.kv(stage), k_cache + (size_t)page_id * page_stride + a.kh * HEAD_DIM_QK,
                           token_stride, tid);
        cp_async_arrive(&sm.full_bar()[stage]);
    });
}

// Producer warpgroup, both engines: thread 0 puts chunks [MIXED_CP_CHUNKS, 9) on TMA, then all
// 128 threads copy chunks [0, MIXED_CP_CHUNKS) by cp.async. The full barrier expects 128
// cp.async arrivals, thread 0's expect_tx arrival and the TMA bytes.
DEVICE void run_producer_mixed(const DecodeArgs& a, const SharedTiles& sm, const uint16_t* k_cache,
                               long long page_stride, long long token_stride, int tid) {
    constexpr int CP_VECS_PER_TOKEN = MIXED_CP_CHUNKS > 0 ? MIXED_CP_CHUNKS * 8 : 1;  // 1: not called
    const uint64_t policy = a.kv_evict_first ? l2_policy_evict_first() : l2_policy_evict_last();
    for_each_ring_page(a, sm, [&](int stage, int page_id) {
        if (tid == 0) {
            mbarrier_arrive_expect_tx(&sm.full_bar()[stage], (QK_CHUNKS - MIXED_CP_CHUNKS) * CHUNK_BYTES);
            load_chunks_tma(a, sm, stage, page_id, MIXED_CP_CHUNKS, policy);
        }
        const uint16_t* src = k_cache + (size_t)page_id * page_stride + a.kh * HEAD_DIM_QK;
        for (int idx = tid; idx < PAGE_SIZE * CP_VECS_PER_TOKEN; idx += WG_THREADS) {
            const int r = idx / CP_VECS_PER_TOKEN, v = idx % CP_VECS_PER_TOKEN;
            cp_async_16(sm.kv(stage) + (v / 8) * CHUNK_BYTES + r * 128 + (((v % 8) ^ (r & 7)) << 4),
                        src + r * token_stride + v * 8);
        }
        cp_async_arrive(&sm.full_bar()[stage]);
    });
}

// Both math warpgroups: take each page as soon as it lands and hand the stage straight back
// (no Q, no wgmma, no softmax); then write a zero output (final or partial) as v1 would.
DEVICE void run_drain_wg(const DecodeArgs& a, const SharedTiles& sm, int tid, int col_base, bool write_lse) {
    const int warp = (tid % WG_THREADS) / 32, lane = tid % 32;
    int it = 0;
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        for (int page = piece.page_begin; page < piece.page_end; ++page, ++it) {
            const int stage = it % KV_STAGES;
            mbarrier_wait(&sm.full_bar()[stage], (it / KV_STAGES) & 1);
            if (HOLD_NS > 0) {
                const uint64_t t0 = global_timer_ns();  // ptx_helpers.cuh
                while ((long long)(global_timer_ns() - t0) < HOLD_NS) {
                    if (DIAG_HOLD_SLEEP) __nanosleep(64);
                }
            }
            mbarrier_arrive(&sm.empty_bar()[stage]);
        }
        float o[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.f;
        const float row_sum[2] = {1.f, 1.f}, row_lse[2] = {0.f, 0.f};
        store_output(o, row_sum, row_lse, col_base, warp, lane, piece, a.kh, a.row_base, a.rows, a.s_q,
                     a.h_q, a.h_k, a.out, a.lse, a.o_part, a.lse_part, write_lse);
    }
}

// q: [b, s_q, h_q, 576] with the given element strides; block_table: [b, *] int32 with row
// stride bt_stride; out: contiguous [b, s_q, h_q, 512]; lse: contiguous [b, h_q, s_q];
// o_part: [splits, h_k, s_q*G, 512] f32; lse_part: [splits, h_k, s_q*G] f32.
// Grid: (ceil(s_q*G / 64), h_k, num_sm_parts).
extern "C" __global__ void __launch_bounds__(DECODE_THREADS, 1)
mla_decode(const __grid_constant__ TensorMap kv_map, const uint16_t* __restrict__ q,
           long long q_stride_b, long long q_stride_s, long long q_stride_h,
           const int* __restrict__ block_table, long long bt_stride,
           const int* __restrict__ seqlens, const int* __restrict__ metadata,
           const int* __restrict__ num_splits, uint16_t* __restrict__ out,
           float* __restrict__ lse, float* __restrict__ o_part, float* __restrict__ lse_part,
           int s_q, int h_q, int h_k, int causal, float scale_log2, int kv_evict_first,
           const uint16_t* __restrict__ k_cache, long long kv_page_stride, long long kv_token_stride) {
    extern __shared__ uint8_t smem_raw[];
    const SharedTiles sm{reinterpret_cast<uint8_t*>(
        (reinterpret_cast<size_t>(smem_raw) + SMEM_ALIGN - 1) & ~size_t(SMEM_ALIGN - 1))};

    DecodeArgs a = gather_decode_args(&kv_map, q, q_stride_b, q_stride_s, q_stride_h, block_table, bt_stride,
                                      seqlens, num_splits, out, lse, o_part, lse_part, s_q, h_q, h_k, causal,
                                      scale_log2, kv_evict_first);
#ifdef MLA_PROGRAMMATIC_LAUNCH
    allow_dependent_launch();  // the combine may take idle SMs and wait there for this grid
    // As the shipped decode: launched programmatically behind the scheduler, every global read
    // comes after this wait.
    grid_dependency_wait();
#endif
    a.work = load_part(metadata, blockIdx.z);
    if (a.work.end_req < a.work.begin_req) return;  // idle part

    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < KV_STAGES; ++s) {
            mbarrier_init(&sm.full_bar()[s], LOAD_BY_CP_ASYNC ? WG_THREADS : MIXED_CP_CHUNKS ? WG_THREADS + 1 : 1);
            mbarrier_init(&sm.empty_bar()[s], CONSUMER_THREADS);
        }
        fence_barrier_init();
    }
    __syncthreads();

    const int wg = tid / WG_THREADS;
    if (wg == 2) {
        setmaxnreg_dec_40();
        if (MIXED_CP_CHUNKS)
            run_producer_mixed(a, sm, k_cache, kv_page_stride, kv_token_stride, tid - 2 * WG_THREADS);
        else if (LOAD_BY_CP_ASYNC)
            run_producer_cp_async(a, sm, k_cache, kv_page_stride, kv_token_stride, tid - 2 * WG_THREADS);
        else if (tid == 2 * WG_THREADS)
            run_producer(a, sm);
    } else {
        run_drain_wg(a, sm, tid, wg == 0 ? 0 : V_COLS_PER_WG, wg == 0);
    }
}
