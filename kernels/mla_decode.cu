// Split-KV MLA decode for Hopper (sm_90a): one CTA per (64-row query block, KV head,
// scheduler part). The part's share of (request, page range) pieces comes from
// tile_scheduler_metadata.
//
// Warpgroup roles (384 threads; setmaxnreg moves registers from the producer to the math):
//   warpgroup 0 (softmax): S = Q K^T with wgmma, masking, online softmax,
//                          O[:, 0:256] += P V with P from registers, P into the
//                          page's rope chunk                                   240 regs
//   warpgroup 1 (PV):      O[:, 256:512] += P V, overlapping warpgroup 0's next S  224 regs
//   warpgroup 2 (producer): streams 64-token pages into a two-stage ring guarded by
//                          full/empty mbarriers, by TMA from one thread or by cp.async
//                          from all 128 (load_by_cp_async; see below)            40 regs
// Q (64 x 576) stays in smem for a whole piece. V is the first 512 columns of the K tile,
// read MN-major by the P V wgmma straight from the same swizzled buffer.
// The online softmax keeps a row's max until a page raises it by more than 8 (log2), so most
// pages skip the rescale of O, and takes a quarter of its exponentials by polynomial on the FMA
// pipe beside the SFU's ex2: the softmax is the tensor pipe's idle time (v26). It first tries a
// page against the kept max, with no page max at all, and takes the page max only when a row's
// P would outgrow the threshold (v28). The softmax is in mla_softmax.cuh.
//
// Hand-offs between the math warpgroups: Q ready, P ready (one per stage) and the final row
// stats are mbarriers. P and the per-row rescale factors have one slot per KV stage, so the KV
// ring's own mbarriers order their reuse. P goes into its page's rope chunk (read only by that
// page's scores, which are done): warpgroup 0 never waits for warpgroup 1 to free a P tile
// (+1-3% on the compute rows of both cards, NOTES.md "v16", "v21").
#include "mla_decode_shared.cuh"
#include "mla_kv_producers.cuh"
#include "mla_softmax.cuh"

constexpr int KV_STAGES = 2;

// Knob (on; v40): with fewer than 64 valid rows (h_q = 16: 16 of 64), the warps of warpgroup 0
// whose 16 rows are all padding skip masking, softmax and P packing (P = 0, alpha = 1). A
// warp-uniform branch; the wgmma stay warpgroup-wide. Fewer instructions per page, not a shorter
// chain (warp 0 still does its rows): bursts unchanged, but back to back at an H100's power cap
// the h_q = 16 rows run 1.2-1.7% faster at a higher clock (run 33).
#ifndef SKIP_PADDING_WARPS
#define SKIP_PADDING_WARPS 1
#endif

constexpr int SOFTMAX_WG_REGS = 240;
constexpr int PV_WG_REGS = 224;
constexpr int PRODUCER_WG_REGS = 40;
static_assert(WG_THREADS * (SOFTMAX_WG_REGS + PV_WG_REGS + PRODUCER_WG_REGS) <=
                  DECODE_THREADS * LAUNCH_REGS_PER_THREAD,
              "register split exceeds the registers the CTA is launched with");

// Two producers, chosen per launch by the API (flashmla_backend/kv_producer.py). TMA is the
// default. cp.async is used only where every page is read once (one query block) on cards
// where it measured faster: up to +2.6% on the memory rows of an H100 and +5% at b = 1, but
// -9-11% on an H200, and -20% wherever several query blocks re-read pages from L2 (NOTES.md
// "v17", "v18").
// The API passes the cache pointer, its page and token strides and the choice (literals it reads).
constexpr bool TAKES_KV_POINTER = true;
constexpr bool SELECTS_KV_PRODUCER = true;
// Then Q's 64 RoPE columns by their own pointer and strides (QSource): the API passes q + 512
// for one [.., 576] tensor, or the second tensor of a (latent, rope) pair.
constexpr bool TAKES_Q_ROPE_POINTER = true;

// Hand-off mbarriers between the math warpgroups (index into SharedTiles::handoff_bar()).
constexpr int HB_Q_READY = 0;    // both WGs copied Q       (256 arrivals, WG0 waits)
constexpr int HB_STATS = 1;      // WG0 stored row max/sum  (128 arrivals, WG1 waits)
constexpr int HB_P_READY = 2;    // + stage: WG0 stored P and scales of that stage (128 arrivals)
constexpr int HANDOFF_BARRIERS = 2 + KV_STAGES;
constexpr int ROPE_CHUNK = QK_CHUNKS - 1;  // a page's chunk that holds its P after its scores
// Named barriers (0 is __syncthreads).
constexpr int BAR_WG0 = 2;       // WG0's V-tail zeroes, before its P V wgmma

// Shared memory map (byte offsets from a 1024-aligned base).
constexpr int SMEM_Q = 0;
constexpr int SMEM_KV = TILE_BYTES;
constexpr int SMEM_ROW_SCALE = SMEM_KV + KV_STAGES * TILE_BYTES;
constexpr int SMEM_ROW_MAX = SMEM_ROW_SCALE + KV_STAGES * BLOCK_M * 4;  // row_scale: one per stage
constexpr int SMEM_ROW_SUM = SMEM_ROW_MAX + BLOCK_M * 4;
constexpr int SMEM_BARRIERS = SMEM_ROW_SUM + BLOCK_M * 4;
constexpr int SMEM_USED = SMEM_BARRIERS + (2 * KV_STAGES + HANDOFF_BARRIERS) * 8;
constexpr int SMEM_ALIGN = 1024;
constexpr int DECODE_SMEM_BYTES = SMEM_USED + SMEM_ALIGN;  // slack to align the base
static_assert(DECODE_SMEM_BYTES <= 227 * 1024, "decode tile does not fit in shared memory");
#ifdef MLA_LAUNCH_SMEM_BYTES  // what the API reserves (flashmla_backend._constants)
static_assert(DECODE_SMEM_BYTES <= MLA_LAUNCH_SMEM_BYTES, "the launch reserves less shared memory than this map needs");
#endif

struct SharedTiles {
    uint8_t* base;
    DEVICE uint8_t* q() const { return base + SMEM_Q; }
    DEVICE uint8_t* kv(int stage) const { return base + SMEM_KV + stage * TILE_BYTES; }
    DEVICE uint8_t* p(int stage) const { return kv(stage) + ROPE_CHUNK * CHUNK_BYTES; }
    DEVICE float* row_scale(int stage) const {
        return reinterpret_cast<float*>(base + SMEM_ROW_SCALE) + stage * BLOCK_M;
    }
    DEVICE float* row_lse() const { return reinterpret_cast<float*>(base + SMEM_ROW_MAX); }
    DEVICE float* row_sum() const { return reinterpret_cast<float*>(base + SMEM_ROW_SUM); }
    DEVICE uint64_t* full_bar() const { return reinterpret_cast<uint64_t*>(base + SMEM_BARRIERS); }
    DEVICE uint64_t* empty_bar() const { return full_bar() + KV_STAGES; }
    DEVICE uint64_t* handoff_bar(int which) const { return full_bar() + 2 * KV_STAGES + which; }
};

DEVICE void setmaxnreg_inc_240() { asm volatile("setmaxnreg.inc.sync.aligned.u32 240;"); }
DEVICE void setmaxnreg_inc_224() { asm volatile("setmaxnreg.inc.sync.aligned.u32 224;"); }
DEVICE void setmaxnreg_dec_40() { asm volatile("setmaxnreg.dec.sync.aligned.u32 40;"); }

// Thread 0: the KV ring's and the hand-offs' mbarriers, fenced for the async proxy.
DEVICE void init_ring_barriers(const SharedTiles& sm, int load_by_cp_async) {
    for (int s = 0; s < KV_STAGES; ++s) {
        // cp.async: one arrival per producer thread; TMA: the issuing thread's expect_tx.
        mbarrier_init(&sm.full_bar()[s], load_by_cp_async ? WG_THREADS : 1);
        mbarrier_init(&sm.empty_bar()[s], CONSUMER_THREADS);
    }
    mbarrier_init(sm.handoff_bar(HB_Q_READY), CONSUMER_THREADS);
    for (int s = 0; s < KV_STAGES; ++s) mbarrier_init(sm.handoff_bar(HB_P_READY + s), WG_THREADS);
    mbarrier_init(sm.handoff_bar(HB_STATS), WG_THREADS);
    fence_barrier_init();
}

// Both math warpgroups copy their share of the Q block (cp.async, all in flight, then waited
// for) and arrive at HB_Q_READY; warpgroup 0 waits for phase q_phase (the number of earlier
// pieces with pages).
DEVICE void stage_q_block(const DecodeArgs& a, const SharedTiles& sm, int req, int tid, bool waits,
                          int q_phase) {
    load_q_block(sm.q(), a.q, req, a.kh, a.row_base, a.rows, tid);
    cp_async_wait_all();
    fence_proxy_async_smem();
    mbarrier_arrive(sm.handoff_bar(HB_Q_READY));
    if (waits) mbarrier_wait(sm.handoff_bar(HB_Q_READY), q_phase & 1);
}

// Warpgroup 0: scores, softmax, P, and the left half of O.
DEVICE void run_softmax_wg(const DecodeArgs& a, const SharedTiles& sm, int tid) {
    const int warp = tid / 32, lane = tid % 32;
    const int row0 = warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
    const bool warp_has_rows = !SKIP_PADDING_WARPS || a.row_base + warp * 16 < a.rows.rows;
    const SmemOperand<> q_tile(smem_addr(sm.q()));
    int it = 0, pieces = 0;
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        const bool has_pages = piece.page_end > piece.page_begin;
        const int seqlen = a.seqlens[req];
        if (has_pages) stage_q_block(a, sm, req, tid, true, pieces);
        if (TRACE_PHASES && has_pages && tid == 0) trace_piece(pieces, PIECE_Q_READY);

        // Key limit of each of this thread's rows (bottom-right causal alignment).
        int limit[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int grow = a.row_base + row0 + 8 * half;
            limit[half] = (a.causal && grow < a.rows.rows) ? seqlen - (a.s_q - 1 - a.rows.s_idx(grow)) : seqlen;
        }
        const int min_limit = a.causal ? seqlen - (a.s_q - 1) : seqlen;
        float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.f, 0.f};
        float o[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.f;

        for (int page = piece.page_begin; page < piece.page_end; ++page, ++it) {
            const int stage = it % KV_STAGES;
            uint8_t* kv_tile = sm.kv(stage);
            const SmemOperand<> kv_tile_k(smem_addr(kv_tile));             // K for the scores
            const SmemOperand<CHUNK_BYTES> kv_tile_v(smem_addr(kv_tile));  // V for P V
            mbarrier_wait(&sm.full_bar()[stage], (it / KV_STAGES) & 1);
            if (TRACE_PHASES && tid == 0 && page == piece.page_begin) trace_piece(pieces, PIECE_FIRST_PAGE);
            if (TRACE_PHASES && tid == 0) trace_page(pieces == 0, page - piece.page_begin, PG_READY);

            float s[32];
#pragma unroll
            for (int i = 0; i < 32; ++i) s[i] = 0.f;
            wgmma_fence();
#pragma unroll
            for (int c = 0; c < QK_CHUNKS; ++c)
#pragma unroll
                for (int k = 0; k < CHUNK_COLS / K_STEP; ++k)
                    wgmma_m64n64k16_ss(s, q_tile.at(c * CHUNK_BYTES + k * K_STEP * 2),
                                       kv_tile_k.at(c * CHUNK_BYTES + k * K_STEP * 2), (c | k) != 0);
            wgmma_commit();
            wgmma_wait<0>();
            fence_accumulators(s);
            if (TRACE_PHASES && tid == 0) trace_page(pieces == 0, page - piece.page_begin, PG_SCORES_DONE);

            const int tok0 = page * PAGE_SIZE;
            if (warp_has_rows && tok0 + PAGE_SIZE > min_limit) {
#pragma unroll
                for (int i = 0; i < 32; ++i)
                    if (tok0 + frag_col(i, lane) >= limit[(i >> 1) & 1]) s[i] = NEG_INF;
            }
            if (tok0 + PAGE_SIZE > seqlen) {
                zero_v_tail(kv_tile, seqlen - tok0, tid);
                fence_proxy_async_smem();
                named_barrier_sync(BAR_WG0, WG_THREADS);  // every thread's zeroes, before the P V wgmma
            }

            // P as packed 16-bit pairs: p[2n + half] holds row row0 + 8 half, columns 8n + 2(lane%4)
            // and +1, which is also the A-fragment layout of the k16 slice n / 2. A padding warp's
            // P is 0 and its alpha 1: its rows of O stay 0 and are never stored.
            float alpha[2] = {1.f, 1.f};
            uint32_t p[16];
            if (warp_has_rows) {
                online_softmax_page(s, row_max, row_sum, alpha, a.scale_log2);
#pragma unroll
                for (int n = 0; n < 8; ++n)
#pragma unroll
                    for (int half = 0; half < 2; ++half)
                        p[2 * n + half] = pack_half2(s[4 * n + 2 * half], s[4 * n + 2 * half + 1]);
            } else {
#pragma unroll
                for (int i = 0; i < 16; ++i) p[i] = 0u;
            }

            rescale_rows_if_needed(o, alpha[0], alpha[1]);
            wgmma_fence();
#pragma unroll
            for (int k = 0; k < PAGE_SIZE / K_STEP; ++k)
                wgmma_m64n256k16_rs_bt(o, p[4 * k], p[4 * k + 1], p[4 * k + 2], p[4 * k + 3],
                                       kv_tile_v.at(k * K_STEP * 128));
            wgmma_commit();

            // While that runs: P (into this page's rope chunk, in the A-fragment layout, 128B
            // swizzle; four stmatrix per thread, not sixteen 4-byte stores) and the row scales
            // for warpgroup 1.
            store_p_by_stmatrix(smem_addr(sm.p(stage)), p, warp, lane);
            if (lane % 4 == 0) {
                sm.row_scale(stage)[row0] = alpha[0];
                sm.row_scale(stage)[row0 + 8] = alpha[1];
            }
            fence_proxy_async_smem();
            mbarrier_arrive(sm.handoff_bar(HB_P_READY + stage));
            if (TRACE_PHASES && tid == 0) trace_page(pieces == 0, page - piece.page_begin, PG_P_STORED);
            wgmma_wait<0>();
            fence_accumulators(o);
            fence_fragments(p);  // the P V wgmma read p until the wait
            if (TRACE_PHASES && tid == 0) trace_page(pieces == 0, page - piece.page_begin, PG_PV0_DONE);
            mbarrier_arrive(&sm.empty_bar()[stage]);
        }

        if (TRACE_PHASES && has_pages && tid == 0) trace_piece(pieces, PIECE_PAGES_DONE);
        float row_lse[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float l = row_sum[half];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            row_sum[half] = l;
            row_lse[half] = (row_max[half] + log2f(l)) * LN2;
        }
        if (has_pages) {
            if (lane % 4 == 0) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    sm.row_lse()[row0 + 8 * half] = row_lse[half];
                    sm.row_sum()[row0 + 8 * half] = row_sum[half];
                }
            }
            mbarrier_arrive(sm.handoff_bar(HB_STATS));
            ++pieces;
        }
        store_output(o, row_sum, row_lse, 0, warp, lane, piece, a.kh, a.row_base, a.rows, a.s_q,
                     a.h_q, a.h_k, a.out, a.lse, a.o_part, a.lse_part, true);
        if (TRACE_PHASES && has_pages && tid == 0) trace_piece(pieces - 1, PIECE_STORED);
    }
}

// Warpgroup 1: the right half of O, one page behind warpgroup 0's scores.
DEVICE void run_pv_wg(const DecodeArgs& a, const SharedTiles& sm, int tid) {
    const int warp = tid / 32, lane = tid % 32;
    const int row0 = warp * 16 + lane / 4;
    constexpr int RIGHT_HALF_BYTES = (V_COLS_PER_WG / CHUNK_COLS) * CHUNK_BYTES;
    int it = 0, pieces = 0;
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        const bool has_pages = piece.page_end > piece.page_begin;
        if (has_pages) stage_q_block(a, sm, req, WG_THREADS + tid, false, pieces);
        float o[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.f;
        for (int page = piece.page_begin; page < piece.page_end; ++page, ++it) {
            const int stage = it % KV_STAGES;
            mbarrier_wait(sm.handoff_bar(HB_P_READY + stage), (it / KV_STAGES) & 1);
            if (TRACE_PHASES && tid == 0) trace_page(pieces == 0, page - piece.page_begin, PG_P_RECEIVED);
            rescale_rows_if_needed(o, sm.row_scale(stage)[row0], sm.row_scale(stage)[row0 + 8]);
            pv_gemm(o, smem_addr(sm.p(stage)), smem_addr(sm.kv(stage)) + RIGHT_HALF_BYTES);
            if (TRACE_PHASES && tid == 0) trace_page(pieces == 0, page - piece.page_begin, PG_PV1_DONE);
            mbarrier_arrive(&sm.empty_bar()[stage]);
        }
        float row_sum[2] = {0.f, 0.f}, row_lse[2] = {0.f, 0.f};
        if (has_pages) {
            mbarrier_wait(sm.handoff_bar(HB_STATS), pieces & 1);
            ++pieces;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                row_lse[half] = sm.row_lse()[row0 + 8 * half];
                row_sum[half] = sm.row_sum()[row0 + 8 * half];
            }
        }
        store_output(o, row_sum, row_lse, V_COLS_PER_WG, warp, lane, piece, a.kh, a.row_base, a.rows,
                     a.s_q, a.h_q, a.h_k, a.out, a.lse, a.o_part, a.lse_part, false);
    }
    if (TRACE_PHASES && tid == 0) trace_phase(EV_MATH1_DONE);
}

// q: the latent columns [b, s_q, h_q, 512] and q_rope the RoPE columns [b, s_q, h_q, 64], each
// with the given element strides (q_rope = q + 512 for one [.., 576] tensor); block_table:
// [b, *] int32 with row stride bt_stride; out: contiguous [b, s_q, h_q, 512]; lse: contiguous
// [b, h_q, s_q]; o_part: [splits, h_k, s_q*G, 512] f32; lse_part: [splits, h_k, s_q*G] f32.
// Grid: (ceil(s_q*G / 64), h_k, num_sm_parts).
extern "C" __global__ void __launch_bounds__(DECODE_THREADS, 1)
mla_decode(const __grid_constant__ TensorMap kv_map, const uint16_t* __restrict__ q,
           long long q_stride_b, long long q_stride_s, long long q_stride_h,
           const int* __restrict__ block_table, long long bt_stride,
           const int* __restrict__ seqlens, const int* __restrict__ metadata,
           const int* __restrict__ num_splits, uint16_t* __restrict__ out,
           float* __restrict__ lse, float* __restrict__ o_part, float* __restrict__ lse_part,
           int s_q, int h_q, int h_k, int causal, float scale_log2, int kv_evict_first,
           const uint16_t* __restrict__ k_cache, long long kv_page_stride, long long kv_token_stride,
           int load_by_cp_async, const uint16_t* __restrict__ q_rope, long long q_rope_stride_b,
           long long q_rope_stride_s, long long q_rope_stride_h) {
    extern __shared__ uint8_t smem_raw[];
    // The base is smem_raw plus an offset (not a rounded integer) so that the compiler keeps it in
    // the shared window: P and the row statistics go by st.shared / ld.shared, not generic 64-bit
    // stores (with P by stmatrix below: compute +3-6%, run 20, H100).
    const SharedTiles sm{smem_raw + (SMEM_ALIGN - smem_addr(smem_raw) % SMEM_ALIGN) % SMEM_ALIGN};

    DecodeArgs a = gather_decode_args(&kv_map, q, q_stride_b, q_stride_s, q_stride_h, block_table, bt_stride,
                                      seqlens, num_splits, out, lse, o_part, lse_part, s_q, h_q, h_k, causal,
                                      scale_log2, kv_evict_first);
    a.q.rope = q_rope;
    a.q.rope_stride_b = q_rope_stride_b; a.q.rope_stride_s = q_rope_stride_s; a.q.rope_stride_h = q_rope_stride_h;
    if (TRACE_PHASES && threadIdx.x == 0) trace_phase(EV_ENTRY);
#ifdef MLA_PROGRAMMATIC_LAUNCH
    if (!DEPENDENTS_AFTER_FIRST_ISSUE) allow_dependent_launch();  // the combine may take idle SMs and wait there
    // Launched programmatically behind the stream's previous kernel (the scheduler, or whatever
    // wrote q, the cache or the block table): this CTA's launch and setup overlapped its tail;
    // every global read comes after this wait.
    grid_dependency_wait();
#endif
    if (TRACE_PHASES && threadIdx.x == 0) trace_phase(EV_DEPENDENCY_DONE);
    a.work = load_part(metadata, blockIdx.z);
    if (a.work.end_req < a.work.begin_req) return;  // idle part (the whole CTA)

    const int tid = threadIdx.x;
    if (tid == 0) init_ring_barriers(sm, load_by_cp_async);
    __syncthreads();

    const int wg = tid / WG_THREADS;
    if (wg == 2) {
        setmaxnreg_dec_40();
        if (load_by_cp_async)
            run_cp_async_producer<KV_STAGES>(a, sm, k_cache, kv_page_stride, kv_token_stride, tid - 2 * WG_THREADS);
        else if (tid == 2 * WG_THREADS)
            run_tma_producer<KV_STAGES>(a, sm);
    } else if (wg == 0) {
        setmaxnreg_inc_240();
        run_softmax_wg(a, sm, tid);
    } else {
        setmaxnreg_inc_224();
        run_pv_wg(a, sm, tid - WG_THREADS);
    }
}
