// EXPERIMENT v6 (not shipped, not yet run; NOTES.md "v6"): seesaw schedule, after FlashMLA's
// 2025-04 write-up (its algorithm; this code is ours). Pages go in pairs: warpgroup 0 scores
// the even page (buffer 0), warpgroup 1 the odd one (buffer 1), so one group's softmax runs
// while the other's wgmma does. The running row max passes 0 -> 1 -> 0 once per pair; each
// group multiplies its own P into its half of O straight from registers (wgmma with A in
// registers) and hands P to the other group through the page's rope chunk, which is free once
// the scores are done:
//   WG0: S0 = Q K0^T; m0 = max(m, rowmax S0); P0 = exp(S0 - m0); O_L = O_L s0 + P0 V0_L
//        wait m1; P0 *= s1 -> smem; O_L = O_L s1 + P1 V1_L
//   WG1: S1 = Q K1^T; wait m0; m1 = max(m0, rowmax S1); P1 = exp(S1 - m1) -> smem;
//        O_R = O_R s0 s1 + P1 V1_R; O_R += (P0 s1) V0_R
// with s0 = exp(m - m0), s1 = exp(m0 - m1). Each buffer is loaded in two groups of chunks: the
// owner's V half first (freed by the owner after its P V), then the other half and the rope
// chunk (freed by the other group after its P V), so the next pair's loads start early.
// A piece with an odd page count ends with a half pair (no odd page: s1 = 1); every piece
// starts at buffer 0.
//
// Warpgroup roles (384 threads): 0 and 1 math (232 registers each), 2 the TMA producer (40).
#include "mla_decode_shared.cuh"

constexpr int HALF_CHUNKS = V_CHUNKS / 2;               // 4: one warpgroup's half of V
constexpr int ROPE_CHUNK = QK_CHUNKS - 1;               // 8: rope columns; then P of the pair
constexpr int KV_BUFFERS = 2;                           // buffer b: pages scored by warpgroup b
constexpr int MATH_WG_REGS = 232;
constexpr int PRODUCER_WG_REGS = 40;
static_assert(WG_THREADS * (2 * MATH_WG_REGS + PRODUCER_WG_REGS) <= 65536,
              "register split exceeds the register file");
constexpr uint32_t OWN_GROUP_BYTES = HALF_CHUNKS * CHUNK_BYTES;
constexpr uint32_t REST_GROUP_BYTES = (QK_CHUNKS - HALF_CHUNKS) * CHUNK_BYTES;

// Named barriers (0 is __syncthreads).
constexpr int BAR_Q_READY = 1;   // both WGs stored Q                         (both wait)
constexpr int BAR_MAX0 = 2;      // WG0 published its row max for the pair    (WG0 arrives, WG1 waits)
constexpr int BAR_MAX1 = 3;      // WG1 published its row max for the pair    (WG1 arrives, WG0 waits)
constexpr int BAR_P0_READY = 4;  // WG0 stored s1-scaled P0 in buffer 0       (WG0 arrives, WG1 waits)
constexpr int BAR_P1_READY = 5;  // WG1 stored P1 in buffer 1                 (WG1 arrives, WG0 waits)
constexpr int BAR_STATS = 6;     // both stored their row-sum partials       (both wait)
constexpr int BAR_WG0 = 7;       // within WG0: V-tail zeros / P0 store after its own wgmma
constexpr int BAR_WG1 = 8;       // within WG1: V-tail zeros before its own wgmma

// Shared memory map (byte offsets from a 1024-aligned base).
constexpr int SMEM_Q = 0;
constexpr int SMEM_KV = TILE_BYTES;
constexpr int SMEM_ROWS = SMEM_KV + KV_BUFFERS * TILE_BYTES;  // max0, max1, sum0, sum1
constexpr int SMEM_BARRIERS = SMEM_ROWS + 4 * BLOCK_M * 4;
constexpr int SMEM_USED = SMEM_BARRIERS + 4 * KV_BUFFERS * 8;
constexpr int SMEM_ALIGN = 1024;
constexpr int DECODE_SMEM_BYTES = SMEM_USED + SMEM_ALIGN;  // slack to align the base
static_assert(DECODE_SMEM_BYTES <= 227 * 1024, "decode tile does not fit in shared memory");
#ifdef MLA_LAUNCH_SMEM_BYTES  // what the API reserves (flashmla_backend._constants)
static_assert(DECODE_SMEM_BYTES <= MLA_LAUNCH_SMEM_BYTES, "the launch reserves less shared memory than this map needs");
#endif

struct SharedTiles {
    uint8_t* base;
    DEVICE uint8_t* q() const { return base + SMEM_Q; }
    DEVICE uint8_t* kv(int buffer) const { return base + SMEM_KV + buffer * TILE_BYTES; }
    DEVICE float* row_max(int wg) const { return reinterpret_cast<float*>(base + SMEM_ROWS) + wg * BLOCK_M; }
    DEVICE float* row_sum(int wg) const {
        return reinterpret_cast<float*>(base + SMEM_ROWS) + (2 + wg) * BLOCK_M;
    }
    // Per buffer: "own" = the owner's V half, "rest" = the other half and the rope chunk.
    DEVICE uint64_t* full_own(int b) const { return reinterpret_cast<uint64_t*>(base + SMEM_BARRIERS) + b; }
    DEVICE uint64_t* full_rest(int b) const { return full_own(0) + KV_BUFFERS + b; }
    DEVICE uint64_t* empty_own(int b) const { return full_own(0) + 2 * KV_BUFFERS + b; }
    DEVICE uint64_t* empty_rest(int b) const { return full_own(0) + 3 * KV_BUFFERS + b; }
};

// Chunk index of position i (0..8) in buffer b's load and scoring order: own half, other
// half, rope.
template <int B>
DEVICE constexpr int chunk_in_order(int i) {
    return i < HALF_CHUNKS ? B * HALF_CHUNKS + i : (i < V_CHUNKS ? (1 - B) * HALF_CHUNKS + i - HALF_CHUNKS : ROPE_CHUNK);
}

DEVICE void setmaxnreg_inc_232() { asm volatile("setmaxnreg.inc.sync.aligned.u32 232;"); }
DEVICE void setmaxnreg_dec_40() { asm volatile("setmaxnreg.dec.sync.aligned.u32 40;"); }

// Producer: page k of a piece goes to buffer k % 2, own group first, then the rest.
template <int B>
DEVICE void load_page(const DecodeArgs& a, const SharedTiles& sm, int page_id, uint32_t empty_parity,
                      uint64_t policy) {
    mbarrier_wait(sm.empty_own(B), empty_parity);
    mbarrier_arrive_expect_tx(sm.full_own(B), OWN_GROUP_BYTES);
#pragma unroll
    for (int i = 0; i < HALF_CHUNKS; ++i) {
        const int c = chunk_in_order<B>(i);
        tma_load_4d(sm.kv(B) + c * CHUNK_BYTES, a.kv_map, sm.full_own(B), c * CHUNK_COLS, a.kh, 0, page_id, policy);
    }
    mbarrier_wait(sm.empty_rest(B), empty_parity);
    mbarrier_arrive_expect_tx(sm.full_rest(B), REST_GROUP_BYTES);
#pragma unroll
    for (int i = HALF_CHUNKS; i < QK_CHUNKS; ++i) {
        const int c = chunk_in_order<B>(i);
        tma_load_4d(sm.kv(B) + c * CHUNK_BYTES, a.kv_map, sm.full_rest(B), c * CHUNK_COLS, a.kh, 0, page_id, policy);
    }
}

DEVICE void run_producer(const DecodeArgs& a, const SharedTiles& sm) {
    const uint64_t policy = a.kv_evict_first ? l2_policy_evict_first() : l2_policy_evict_last();
    int loads[KV_BUFFERS] = {0, 0};
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        const int* pages = a.block_table + (size_t)req * a.bt_stride;
        for (int k = 0; piece.page_begin + k < piece.page_end; ++k) {
            const int page_id = pages[piece.page_begin + k];
            if ((k & 1) == 0) load_page<0>(a, sm, page_id, (loads[0]++ & 1) ^ 1, policy);
            else load_page<1>(a, sm, page_id, (loads[1]++ & 1) ^ 1, policy);
        }
    }
}

// Both math warpgroups store their share of the Q block, then meet (both read Q).
DEVICE void stage_q_block(const DecodeArgs& a, const SharedTiles& sm, int req, int consumer_tid) {
    load_q_block(sm.q(), a.q, a.q_stride_b, a.q_stride_s, a.q_stride_h, req, a.kh, a.row_base,
                 a.rows, consumer_tid);
    fence_proxy_async_smem();
    named_barrier_sync(BAR_Q_READY, CONSUMER_THREADS);
}

// S = Q K^T for the page in buffer B, chunks in load order (scoring starts on the own group).
template <int B>
DEVICE void compute_scores(float (&s)[32], const SharedTiles& sm, uint32_t full_parity) {
    const uint32_t q_addr = smem_addr(sm.q()), kv_addr = smem_addr(sm.kv(B));
#pragma unroll
    for (int i = 0; i < 32; ++i) s[i] = 0.f;
    mbarrier_wait(sm.full_own(B), full_parity);
    wgmma_fence();
#pragma unroll
    for (int i = 0; i < QK_CHUNKS; ++i) {
        if (i == HALF_CHUNKS) {
            wgmma_commit();
            mbarrier_wait(sm.full_rest(B), full_parity);
        }
        const int c = chunk_in_order<B>(i);
#pragma unroll
        for (int k = 0; k < CHUNK_COLS / K_STEP; ++k)
            wgmma_m64n64k16_ss(s, desc_k_major(q_addr + c * CHUNK_BYTES + k * K_STEP * 2),
                               desc_k_major(kv_addr + c * CHUNK_BYTES + k * K_STEP * 2), (i | k) != 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(s);
}

// Per-row key limits of this thread's rows (bottom-right causal alignment).
struct RowLimits {
    int limit[2], min_limit, seqlen;
};

DEVICE RowLimits row_limits(const DecodeArgs& a, int row0, int seqlen) {
    RowLimits r;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int grow = a.row_base + row0 + 8 * half;
        r.limit[half] = (a.causal && grow < a.rows.rows) ? seqlen - (a.s_q - 1 - a.rows.s_idx(grow)) : seqlen;
    }
    r.min_limit = a.causal ? seqlen - (a.s_q - 1) : seqlen;
    r.seqlen = seqlen;
    return r;
}

// Masks keys past each row's limit; zeroes the V rows past the sequence end (they may hold
// NaN, and P = 0 times NaN is NaN) before any P V reads them. Returns whether it zeroed.
DEVICE bool mask_page(float (&s)[32], uint8_t* kv_tile, int page, const RowLimits& lim, int wg_tid) {
    const int lane = wg_tid % 32, tok0 = page * PAGE_SIZE;
    if (tok0 + PAGE_SIZE > lim.min_limit) {
#pragma unroll
        for (int i = 0; i < 32; ++i)
            if (tok0 + frag_col(i, lane) >= lim.limit[(i >> 1) & 1]) s[i] = NEG_INF;
    }
    if (tok0 + PAGE_SIZE > lim.seqlen) {
        zero_v_tail(kv_tile, lim.seqlen - tok0, wg_tid);
        fence_proxy_async_smem();
        return true;
    }
    return false;
}

// Row maxima of raw scores in the log2 domain, over the quad that holds each row.
DEVICE void scaled_row_max(const float (&s)[32], float scale_log2, float (&mx)[2]) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float m = NEG_INF;
#pragma unroll
        for (int i = 0; i < 32; ++i)
            if (((i >> 1) & 1) == half) m = fmaxf(m, s[i]);
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        mx[half] = m * scale_log2;
    }
}

DEVICE float usable_max(float m) { return m == NEG_INF ? 0.f : m; }

// Running row max after a page whose row maxima are mx: m becomes max(m, mx); returns in
// `rescale` what earlier sums and O must be multiplied by (exp2(m_old - m_new)) and in `m_use`
// the max to subtract (0 while a row has seen only masked keys); publishes m for the other group.
DEVICE void advance_row_max(float (&m)[2], const float (&mx)[2], float (&m_use)[2], float (&rescale)[2],
                            float* published, int row0, int lane) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const float m_new = fmaxf(m[half], mx[half]);
        m_use[half] = usable_max(m_new);
        rescale[half] = exp2f(m[half] - m_use[half]);
        m[half] = m_new;
        if (lane % 4 == 0) published[row0 + 8 * half] = m_new;
    }
}

// s <- exp2(s * scale_log2 - m) in place; returns this thread's partial row sums.
DEVICE void exponentiate(float (&s)[32], float scale_log2, const float (&m_use)[2], float (&sum)[2]) {
    sum[0] = sum[1] = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
        const int half = (i >> 1) & 1;
        s[i] = exp2f(s[i] * scale_log2 - m_use[half]);
        sum[half] += s[i];
    }
}

// P (accumulator layout) times a per-row-half scale -> 16-bit A fragments of the four k16
// slices: slice kk is the two n8 blocks 2kk and 2kk+1, exactly the wgmma A register layout;
// pa[j] holds row half j & 1.
DEVICE void pack_p(const float (&s)[32], const float (&scale)[2], uint32_t (&pa)[16]) {
#pragma unroll
    for (int j = 0; j < 16; ++j) pa[j] = pack_half2(s[2 * j] * scale[j & 1], s[2 * j + 1] * scale[j & 1]);
}

// Stores P (packed) into a 64 x 64 K-major 128B-swizzled chunk, the layout TMA gives K.
DEVICE void store_p(uint8_t* chunk, const uint32_t (&pa)[16], int wg_tid) {
    const int warp = wg_tid / 32, lane = wg_tid % 32;
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = warp * 16 + lane / 4 + 8 * half;
            *reinterpret_cast<uint32_t*>(chunk + r * 128 + ((n ^ (r & 7)) << 4) + (lane % 4) * 4) =
                pa[2 * n + half];
        }
}

// O[:, half] += P V for one page, P from registers.
DEVICE void pv_gemm_rs(float (&o)[128], uint32_t (&pa)[16], uint32_t v_addr) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < PAGE_SIZE / K_STEP; ++kk)
        wgmma_m64n256k16_rs_bt(o, pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3],
                               desc_mn_major(v_addr + kk * K_STEP * 128, CHUNK_BYTES));
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(o);
#pragma unroll
    for (int j = 0; j < 16; ++j) asm volatile("" : "+r"(pa[j])::"memory");  // live until read
}

// End of a piece: the two groups add their row-sum partials and write their halves of O.
DEVICE void finish_piece(const DecodeArgs& a, const SharedTiles& sm, const Piece& piece, bool has_pages,
                         int wg, int wg_tid, const float (&o)[128], float (&l)[2], const float (&m)[2]) {
    const int warp = wg_tid / 32, lane = wg_tid % 32, row0 = warp * 16 + lane / 4;
    float row_sum[2] = {0.f, 0.f}, row_lse[2] = {0.f, 0.f};
    if (has_pages) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            l[half] += __shfl_xor_sync(0xffffffffu, l[half], 1);
            l[half] += __shfl_xor_sync(0xffffffffu, l[half], 2);
            if (lane % 4 == 0) sm.row_sum(wg)[row0 + 8 * half] = l[half];
        }
        named_barrier_sync(BAR_STATS, CONSUMER_THREADS);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            row_sum[half] = l[half] + sm.row_sum(1 - wg)[row0 + 8 * half];
            row_lse[half] = (m[half] + log2f(row_sum[half])) * LN2;
        }
    }
    store_output(o, row_sum, row_lse, wg * V_COLS_PER_WG, warp, lane, piece, a.kh, a.row_base, a.rows,
                 a.s_q, a.h_q, a.h_k, a.out, a.lse, a.o_part, a.lse_part, wg == 0);
}

// Warpgroup 0: even pages (buffer 0), left half of O.
DEVICE void run_even_wg(const DecodeArgs& a, const SharedTiles& sm, int tid) {
    const int warp = tid / 32, lane = tid % 32, row0 = warp * 16 + lane / 4;
    int uses = 0;  // pages this group has scored in buffer 0
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        const int pages = piece.page_end - piece.page_begin;
        if (pages > 0) stage_q_block(a, sm, req, tid);
        const RowLimits lim = row_limits(a, row0, a.seqlens[req]);
        float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
        float o[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.f;

        for (int k = 0; k < pages; k += 2) {
            const bool has_odd = k + 1 < pages;
            float s[32];
            compute_scores<0>(s, sm, uses++ & 1);
            const bool zeroed = mask_page(s, sm.kv(0), piece.page_begin + k, lim, tid);

            float mx[2], m0_use[2], s0[2], sum[2];
            scaled_row_max(s, a.scale_log2, mx);
            advance_row_max(m, mx, m0_use, s0, sm.row_max(0), row0, lane);
            named_barrier_arrive(BAR_MAX0, CONSUMER_THREADS);

            exponentiate(s, a.scale_log2, m0_use, sum);
            uint32_t pa[16];
            const float unscaled[2] = {1.f, 1.f};
            pack_p(s, unscaled, pa);
#pragma unroll
            for (int half = 0; half < 2; ++half) l[half] = l[half] * s0[half] + sum[half];
            rescale_rows(o, s0[0], s0[1]);
            if (zeroed) named_barrier_sync(BAR_WG0, WG_THREADS);
            pv_gemm_rs(o, pa, smem_addr(sm.kv(0)));
            mbarrier_arrive(sm.empty_own(0));

            float s1[2] = {1.f, 1.f};
            if (has_odd) {
                named_barrier_sync(BAR_MAX1, CONSUMER_THREADS);  // also: all of WG0 is past its wgmma
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const float m1 = sm.row_max(1)[row0 + 8 * half];
                    s1[half] = exp2f(m[half] - usable_max(m1));
                    m[half] = m1;
                    l[half] *= s1[half];
                }
            } else {
                named_barrier_sync(BAR_WG0, WG_THREADS);  // all of WG0 is past its wgmma
            }
            // P0 (scaled by s1) goes into buffer 0's rope chunk for warpgroup 1.
            pack_p(s, s1, pa);
            store_p(sm.kv(0) + ROPE_CHUNK * CHUNK_BYTES, pa, tid);
            fence_proxy_async_smem();
            named_barrier_arrive(BAR_P0_READY, CONSUMER_THREADS);

            if (has_odd) {
                named_barrier_sync(BAR_P1_READY, CONSUMER_THREADS);
                rescale_rows(o, s1[0], s1[1]);
                pv_gemm(o, smem_addr(sm.kv(1) + ROPE_CHUNK * CHUNK_BYTES), smem_addr(sm.kv(1)));
                mbarrier_arrive(sm.empty_rest(1));
            }
        }
        finish_piece(a, sm, piece, pages > 0, 0, tid, o, l, m);
    }
}

// Warpgroup 1: odd pages (buffer 1), right half of O.
DEVICE void run_odd_wg(const DecodeArgs& a, const SharedTiles& sm, int tid) {
    const int warp = tid / 32, lane = tid % 32, row0 = warp * 16 + lane / 4;
    constexpr uint32_t RIGHT_HALF_BYTES = HALF_CHUNKS * CHUNK_BYTES;
    int uses = 0;  // pages this group has scored in buffer 1
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        const int pages = piece.page_end - piece.page_begin;
        if (pages > 0) stage_q_block(a, sm, req, WG_THREADS + tid);
        const RowLimits lim = row_limits(a, row0, a.seqlens[req]);
        float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
        float o[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.f;

        for (int k = 0; k < pages; k += 2) {
            const bool has_odd = k + 1 < pages;
            float s[32], mx[2] = {NEG_INF, NEG_INF};
            bool zeroed = false;
            if (has_odd) {
                compute_scores<1>(s, sm, uses++ & 1);
                zeroed = mask_page(s, sm.kv(1), piece.page_begin + k + 1, lim, tid);
                scaled_row_max(s, a.scale_log2, mx);
            }
            named_barrier_sync(BAR_MAX0, CONSUMER_THREADS);  // also: all of WG1 is past its wgmma
            float s0[2], s1[2] = {1.f, 1.f};
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const float m0 = sm.row_max(0)[row0 + 8 * half];
                s0[half] = exp2f(m[half] - usable_max(m0));
                m[half] = m0;
            }
            if (has_odd) {
                float m1_use[2], sum[2];
                advance_row_max(m, mx, m1_use, s1, sm.row_max(1), row0, lane);
                named_barrier_arrive(BAR_MAX1, CONSUMER_THREADS);

                exponentiate(s, a.scale_log2, m1_use, sum);
                uint32_t pa[16];
                const float unscaled[2] = {1.f, 1.f};
                pack_p(s, unscaled, pa);
                store_p(sm.kv(1) + ROPE_CHUNK * CHUNK_BYTES, pa, tid);
                fence_proxy_async_smem();
                named_barrier_arrive(BAR_P1_READY, CONSUMER_THREADS);
#pragma unroll
                for (int half = 0; half < 2; ++half) l[half] = l[half] * s0[half] * s1[half] + sum[half];
                rescale_rows(o, s0[0] * s1[0], s0[1] * s1[1]);
                if (zeroed) named_barrier_sync(BAR_WG1, WG_THREADS);
                pv_gemm_rs(o, pa, smem_addr(sm.kv(1)) + RIGHT_HALF_BYTES);
                mbarrier_arrive(sm.empty_own(1));
            } else {
#pragma unroll
                for (int half = 0; half < 2; ++half) l[half] *= s0[half];
                rescale_rows(o, s0[0], s0[1]);
            }
            named_barrier_sync(BAR_P0_READY, CONSUMER_THREADS);
            pv_gemm(o, smem_addr(sm.kv(0) + ROPE_CHUNK * CHUNK_BYTES), smem_addr(sm.kv(0)) + RIGHT_HALF_BYTES);
            mbarrier_arrive(sm.empty_rest(0));
        }
        finish_piece(a, sm, piece, pages > 0, 1, tid, o, l, m);
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
           int s_q, int h_q, int h_k, int causal, float scale_log2, int kv_evict_first) {
    extern __shared__ uint8_t smem_raw[];
    const SharedTiles sm{reinterpret_cast<uint8_t*>(
        (reinterpret_cast<size_t>(smem_raw) + SMEM_ALIGN - 1) & ~size_t(SMEM_ALIGN - 1))};

    DecodeArgs a = gather_decode_args(&kv_map, q, q_stride_b, q_stride_s, q_stride_h, block_table, bt_stride,
                                      seqlens, num_splits, out, lse, o_part, lse_part, s_q, h_q, h_k, causal,
                                      scale_log2, kv_evict_first);
#ifdef MLA_PROGRAMMATIC_LAUNCH
    allow_dependent_launch();  // the combine may take idle SMs and wait there for this grid
#endif
    a.work = load_part(metadata, blockIdx.z);
    if (a.work.end_req < a.work.begin_req) return;  // idle part

    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int b = 0; b < KV_BUFFERS; ++b) {
            mbarrier_init(sm.full_own(b), 1);
            mbarrier_init(sm.full_rest(b), 1);
            mbarrier_init(sm.empty_own(b), WG_THREADS);   // the owner, after its own P V
            mbarrier_init(sm.empty_rest(b), WG_THREADS);  // the other group, after its P V
        }
        fence_barrier_init();
    }
    __syncthreads();

    const int wg = tid / WG_THREADS;
    if (wg == 2) {
        setmaxnreg_dec_40();
        if (tid == 2 * WG_THREADS) run_producer(a, sm);
    } else if (wg == 0) {
        setmaxnreg_inc_232();
        run_even_wg(a, sm, tid);
    } else {
        setmaxnreg_inc_232();
        run_odd_wg(a, sm, tid - WG_THREADS);
    }
}
