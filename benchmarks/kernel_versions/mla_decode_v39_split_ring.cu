// EXPERIMENT v39 (NOTES.md "v39 — a split ring for the one-query-block rows"; written 2026-12-07,
// eighteenth session, not yet run): the shipped decode's math (warpgroup roles, softmax, P V,
// stores) on a ring that frees a page in parts and holds more of them.
//
// - Two rings instead of one two-stage ring of whole pages: V halves (chunks 0-3 and 4-7 of a
//   page, 32 KB slots, each contiguous so the m64n256 P V descriptors are unchanged) and rope
//   chunks (chunk 8, 8 KB slots, which also carry the page's P). Warpgroup 0 frees a page's left
//   half after its P V; warpgroup 1 frees the right half and the rope slot after its own. The
//   scores wait for each part as it lands (left, right, rope), inside one wgmma chain.
// - At most 16 or 32 query rows (h_q = 16 under TP 8 with s_q = 1 or 2): Q is stored compactly,
//   its real rows per chunk at a 2 or 4 KB chunk stride plus zeros (24 or 40 KB, not 72). The
//   scores' A descriptor still spans 64 rows (8-row groups 1 KB apart): the rows past the real
//   ones read the next chunks or the zeros, finite garbage rows that S, the softmax and P V keep
//   to themselves (row-wise), that only the warps without a real row hold, and that the stores
//   skip.
// - Shared memory: Q in 24 KB + 5 V halves + 3 rope slots (2.5 pages of V: 1.5 in flight while
//   the math holds one; today 1), Q in 40 KB + 5 halves + 2 rope slots, or the full Q + 4 halves
//   + 2 rope slots (the left half freed early, as v35b, on rows > 32).
// - Warpgroup 0 can lead warpgroup 1 by up to 3 pages (page j's slots were last used by page
//   j - 3's right half), so P_READY and the row scales have 3 slots. benchmarks/split_ring_model.py
//   (the three roles' waits and arrivals over random interleavings) finds no lapped phase and no
//   deadlock at the three layouts' ring sizes, and a lapped P_READY with 2 slots.
// - cp.async producer: each slot completes by asynchronous arrival (cp.async.mbarrier.arrive
//   .noinc), so the producer runs ahead into every free slot; warpgroup 0 fences to the async
//   proxy after each full wait, warpgroup 1 after each P_READY.
//   TMA producer: one expect_tx per slot (4 boxes for a half, 1 for a rope chunk).
// Run: device_experiments.sh v39 (a reference check with each producer forced, then the shipped
// decode and v39 alternated on every anchor row).
#include "mla_decode_shared.cuh"
#include "mla_softmax.cuh"

#ifndef DEPENDENTS_AFTER_FIRST_ISSUE
#define DEPENDENTS_AFTER_FIRST_ISSUE 1
#endif

constexpr int SOFTMAX_WG_REGS = 240;
constexpr int PV_WG_REGS = 224;
constexpr int PRODUCER_WG_REGS = 40;
static_assert(WG_THREADS * (SOFTMAX_WG_REGS + PV_WG_REGS + PRODUCER_WG_REGS) <=
                  DECODE_THREADS * LAUNCH_REGS_PER_THREAD,
              "register split exceeds the registers the CTA is launched with");

constexpr bool TAKES_KV_POINTER = true;
constexpr bool SELECTS_KV_PRODUCER = true;

// A page in the rings: V halves (4 chunks each) and the rope chunk.
constexpr int HALF_CHUNKS = V_CHUNKS / 2;                 // 4
constexpr int HALF_BYTES = HALF_CHUNKS * CHUNK_BYTES;     // 32 KB
constexpr int ROPE_CHUNK = QK_CHUNKS - 1;                 // 8: holds the page's P after its scores
constexpr int P_SLOTS = 3;                                // pages warpgroup 0 may lead by

// Q's layouts by the rows it stores (16, 32 or all 64): each chunk's rows at a q_rows * 128 byte
// stride, then the zeros that the garbage rows of the last chunks read.
__host__ __device__ constexpr int q_chunk_stride(int q_rows) { return q_rows * 128; }  // as load_q_block stores it
__host__ __device__ constexpr int q_bytes(int q_rows) {
    return QK_CHUNKS * q_chunk_stride(q_rows) + (BLOCK_M - q_rows) * 128;  // 24, 40 or 72 KB
}
// Ring sizes of each layout: V halves and rope slots.
__host__ __device__ constexpr int v_slots(int q_rows) { return q_rows < BLOCK_M ? 5 : 4; }
__host__ __device__ constexpr int rope_slots(int q_rows) { return q_rows <= 16 ? 3 : 2; }
constexpr int MAX_V_SLOTS = 5, MAX_ROPE_SLOTS = 3;

// Hand-off mbarriers between the math warpgroups (index into SharedTiles::handoff_bar()).
constexpr int HB_Q_READY = 0;    // both WGs copied Q       (256 arrivals, WG0 waits)
constexpr int HB_STATS = 1;      // WG0 stored row max/sum  (128 arrivals, WG1 waits)
constexpr int HB_P_READY = 2;    // + page % P_SLOTS: WG0 stored that page's P and scales (128 arrivals)
constexpr int HANDOFF_BARRIERS = 2 + P_SLOTS;
constexpr int BAR_WG0 = 2;       // named barrier: WG0's V-tail zeroes, before its P V wgmma

// Shared memory map: barriers and row statistics first, then Q, the rope slots, the V halves.
constexpr int RING_BARRIERS = 2 * (MAX_V_SLOTS + MAX_ROPE_SLOTS);
constexpr int SMEM_BARRIERS = 0;
constexpr int SMEM_ROW_SCALE = SMEM_BARRIERS + (RING_BARRIERS + HANDOFF_BARRIERS) * 8;
constexpr int SMEM_ROW_LSE = SMEM_ROW_SCALE + P_SLOTS * BLOCK_M * 4;
constexpr int SMEM_ROW_SUM = SMEM_ROW_LSE + BLOCK_M * 4;
constexpr int SMEM_SMALL_END = SMEM_ROW_SUM + BLOCK_M * 4;
constexpr int SMEM_Q = (SMEM_SMALL_END + 1023) / 1024 * 1024;
constexpr int SMEM_ALIGN = 1024;
__host__ __device__ constexpr int map_bytes(int q_rows) {
    return SMEM_Q + q_bytes(q_rows) + rope_slots(q_rows) * CHUNK_BYTES + v_slots(q_rows) * HALF_BYTES;
}
__host__ __device__ constexpr int max3(int x, int y, int z) { return x > y ? (x > z ? x : z) : (y > z ? y : z); }
constexpr int DECODE_SMEM_BYTES = max3(map_bytes(16), map_bytes(32), map_bytes(BLOCK_M)) + SMEM_ALIGN;
static_assert(q_bytes(BLOCK_M) == TILE_BYTES, "the full Q layout is the shipped one");
static_assert(DECODE_SMEM_BYTES <= 227 * 1024, "decode tile does not fit in shared memory");
#ifdef MLA_LAUNCH_SMEM_BYTES
static_assert(DECODE_SMEM_BYTES <= MLA_LAUNCH_SMEM_BYTES, "the launch reserves less shared memory than this map needs");
#endif
// Warpgroup 0's lead: page j's V slots were last used by pages j - 3 (right half) and j - 2.
static_assert(MAX_V_SLOTS <= 2 * P_SLOTS - 1 && MAX_ROPE_SLOTS <= P_SLOTS, "P_READY slots could lap");

// Position n of a ring of `slots`: the slot and the parity of its use.
struct Ring {
    int slots;
    DEVICE int slot(int n) const { return n % slots; }
    DEVICE uint32_t parity(int n) const { return (uint32_t)(n / slots) & 1u; }
};

struct SharedTiles {
    uint8_t* base;
    int q_bytes;
    Ring v_ring, rope_ring;
    DEVICE uint8_t* q() const { return base + SMEM_Q; }
    DEVICE uint8_t* rope(int slot) const { return base + SMEM_Q + q_bytes + slot * CHUNK_BYTES; }
    DEVICE uint8_t* half(int slot) const {
        return base + SMEM_Q + q_bytes + rope_ring.slots * CHUNK_BYTES + slot * HALF_BYTES;
    }
    DEVICE float* row_scale(int p_slot) const {
        return reinterpret_cast<float*>(base + SMEM_ROW_SCALE) + p_slot * BLOCK_M;
    }
    DEVICE float* row_lse() const { return reinterpret_cast<float*>(base + SMEM_ROW_LSE); }
    DEVICE float* row_sum() const { return reinterpret_cast<float*>(base + SMEM_ROW_SUM); }
    DEVICE uint64_t* bars() const { return reinterpret_cast<uint64_t*>(base + SMEM_BARRIERS); }
    DEVICE uint64_t* full_half(int slot) const { return bars() + slot; }
    DEVICE uint64_t* empty_half(int slot) const { return bars() + MAX_V_SLOTS + slot; }
    DEVICE uint64_t* full_rope(int slot) const { return bars() + 2 * MAX_V_SLOTS + slot; }
    DEVICE uint64_t* empty_rope(int slot) const { return bars() + 2 * MAX_V_SLOTS + MAX_ROPE_SLOTS + slot; }
    DEVICE uint64_t* handoff_bar(int which) const { return bars() + RING_BARRIERS + which; }
};

DEVICE SharedTiles shared_tiles(uint8_t* base, int q_rows) {
    SharedTiles sm;
    sm.base = base;
    sm.q_bytes = q_bytes(q_rows);
    sm.v_ring = Ring{v_slots(q_rows)};
    sm.rope_ring = Ring{rope_slots(q_rows)};
    return sm;
}

DEVICE void setmaxnreg_inc_240() { asm volatile("setmaxnreg.inc.sync.aligned.u32 240;"); }
DEVICE void setmaxnreg_inc_224() { asm volatile("setmaxnreg.inc.sync.aligned.u32 224;"); }
DEVICE void setmaxnreg_dec_40() { asm volatile("setmaxnreg.dec.sync.aligned.u32 40;"); }

// Thread 0: the rings' and the hand-offs' mbarriers, fenced for the async proxy.
DEVICE void init_ring_barriers(const SharedTiles& sm, int load_by_cp_async) {
    const uint32_t fills = load_by_cp_async ? WG_THREADS : 1;  // cp.async: every producer thread arrives
    for (int s = 0; s < sm.v_ring.slots; ++s) {
        mbarrier_init(sm.full_half(s), fills);
        mbarrier_init(sm.empty_half(s), WG_THREADS);  // left: warpgroup 0, right: warpgroup 1
    }
    for (int s = 0; s < sm.rope_ring.slots; ++s) {
        mbarrier_init(sm.full_rope(s), fills);
        mbarrier_init(sm.empty_rope(s), WG_THREADS);  // warpgroup 1, after the P V that reads P
    }
    mbarrier_init(sm.handoff_bar(HB_Q_READY), CONSUMER_THREADS);
    for (int s = 0; s < P_SLOTS; ++s) mbarrier_init(sm.handoff_bar(HB_P_READY + s), WG_THREADS);
    mbarrier_init(sm.handoff_bar(HB_STATS), WG_THREADS);
    fence_barrier_init();
}

// Walks every page of every piece in ring order (it counts pages) and hands (it, page id) to
// fill_page, which fills the page's left half, right half and rope slot, waiting for each.
template <typename FillPage>
DEVICE void for_each_ring_page(const DecodeArgs& a, FillPage fill_page) {
    int it = 0;
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        const int* pages = a.block_table + (size_t)req * a.bt_stride;
        int page_id = piece.page_begin < piece.page_end ? pages[piece.page_begin] : 0;
        for (int page = piece.page_begin; page < piece.page_end; ++page, ++it) {
            const int next_page_id = page + 1 < piece.page_end ? pages[page + 1] : 0;
            fill_page(it, page_id);
            if (DEPENDENTS_AFTER_FIRST_ISSUE && it == 0) allow_dependent_launch();
            page_id = next_page_id;
        }
    }
}

// TMA producer: one thread; each slot completes on its expect_tx.
DEVICE void run_tma_producer(const DecodeArgs& a, const SharedTiles& sm) {
    const uint64_t policy = a.kv_evict_first ? l2_policy_evict_first() : l2_policy_evict_last();
    for_each_ring_page(a, [&](int it, int page_id) {
#pragma unroll 1
        for (int h = 0; h < 2; ++h) {
            const int n = 2 * it + h, slot = sm.v_ring.slot(n);
            mbarrier_wait(sm.empty_half(slot), sm.v_ring.parity(n) ^ 1);
            mbarrier_arrive_expect_tx(sm.full_half(slot), HALF_BYTES);
#pragma unroll
            for (int c = 0; c < HALF_CHUNKS; ++c)
                tma_load_4d(sm.half(slot) + c * CHUNK_BYTES, a.kv_map, sm.full_half(slot),
                            (h * HALF_CHUNKS + c) * CHUNK_COLS, a.kh, 0, page_id, policy);
        }
        const int rslot = sm.rope_ring.slot(it);
        mbarrier_wait(sm.empty_rope(rslot), sm.rope_ring.parity(it) ^ 1);
        mbarrier_arrive_expect_tx(sm.full_rope(rslot), CHUNK_BYTES);
        tma_load_4d(sm.rope(rslot), a.kv_map, sm.full_rope(rslot), ROPE_CHUNK * CHUNK_COLS, a.kh, 0, page_id, policy);
    });
}

// CHUNKS consecutive 64-column chunks of one page (64 token rows), from column chunk first_chunk,
// into a slot, 128B-swizzled, by 16-byte cp.async from 128 threads. Thread tid copies vector
// tid % 8 of token rows tid / 8 + 16 i (i < 4) of every chunk: the same swizzle for all its rows
// (16 i is a multiple of 8), so its destinations are one offset plus 2 KB steps.
struct CpAsyncLane {
    uint32_t dst_off;      // in a slot: row tid / 8, vector tid % 8, swizzled
    long long src_off;     // in a page: the same row and vector
    long long row16_step;  // 16 token rows
};

DEVICE CpAsyncLane cp_async_lane(long long token_stride, int tid) {
    const int r = tid / 8, unit = tid % 8;
    return {(uint32_t)(r * 128 + ((unit ^ (r & 7)) << 4)), r * token_stride + unit * 8, 16 * token_stride};
}

template <int CHUNKS>
DEVICE void copy_chunks_cp_async(uint8_t* slot, const uint16_t* page_src, const CpAsyncLane& lane, int first_chunk) {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        const uint16_t* src = page_src + lane.src_off + (first_chunk + c) * CHUNK_COLS;
        uint8_t* dst = slot + lane.dst_off + c * CHUNK_BYTES;
#pragma unroll
        for (int i = 0; i < PAGE_SIZE / 16; ++i) cp_async_16(dst + i * 16 * 128, src + i * lane.row16_step);
    }
}

// cp.async producer: all 128 threads; each slot completes by asynchronous arrival, so the
// producer moves on to the next free slot while its copies are in flight.
DEVICE void run_cp_async_producer(const DecodeArgs& a, const SharedTiles& sm, const uint16_t* k_cache,
                                  long long page_stride, long long token_stride, int tid) {
    const CpAsyncLane lane = cp_async_lane(token_stride, tid);
    for_each_ring_page(a, [&](int it, int page_id) {
        const uint16_t* page_src = k_cache + (size_t)page_id * page_stride + a.kh * HEAD_DIM_QK;
#pragma unroll 1
        for (int h = 0; h < 2; ++h) {
            const int n = 2 * it + h, slot = sm.v_ring.slot(n);
            mbarrier_wait(sm.empty_half(slot), sm.v_ring.parity(n) ^ 1);
            copy_chunks_cp_async<HALF_CHUNKS>(sm.half(slot), page_src, lane, h * HALF_CHUNKS);
            cp_async_arrive(sm.full_half(slot));
        }
        const int rslot = sm.rope_ring.slot(it);
        mbarrier_wait(sm.empty_rope(rslot), sm.rope_ring.parity(it) ^ 1);
        copy_chunks_cp_async<1>(sm.rope(rslot), page_src, lane, ROPE_CHUNK);
        cp_async_arrive(sm.full_rope(rslot));
    });
}

// Both math warpgroups copy their share of the Q block and arrive at HB_Q_READY; warpgroup 0
// waits for phase q_phase (the number of earlier pieces with pages).
DEVICE void stage_q_block(const DecodeArgs& a, const SharedTiles& sm, int q_rows, int req, int tid,
                          bool waits, int q_phase) {
    load_q_block(sm.q(), a.q, a.q_stride_b, a.q_stride_s, a.q_stride_h, req, a.kh, a.row_base, a.rows, tid, q_rows);
    cp_async_wait_all();
    fence_proxy_async_smem();
    mbarrier_arrive(sm.handoff_bar(HB_Q_READY));
    if (waits) mbarrier_wait(sm.handoff_bar(HB_Q_READY), q_phase & 1);
}

// Zeroes V rows [first_row, 64) of a 4-chunk half: cache slots past the sequence end may hold NaN.
DEVICE void zero_half_tail(uint8_t* half_slot, int first_row, int tid) {
    const int rows = PAGE_SIZE - first_row;
    for (int idx = tid; idx < HALF_CHUNKS * rows * 8; idx += WG_THREADS) {
        const int chunk = idx / (rows * 8), rem = idx % (rows * 8);
        const int r = first_row + rem / 8, unit = rem % 8;
        *reinterpret_cast<uint4*>(half_slot + chunk * CHUNK_BYTES + r * 128 + unit * 16) = make_uint4(0, 0, 0, 0);
    }
}

// Waits for one part of a page (a full barrier of the ring); after cp.async, fences this thread's
// view to the async proxy before its wgmma read it.
DEVICE void wait_part(uint64_t* full, uint32_t parity, int load_by_cp_async) {
    mbarrier_wait(full, parity);
    if (load_by_cp_async) fence_proxy_async_smem();
}

// Warpgroup 0: scores, softmax, P, and the left half of O.
DEVICE void run_softmax_wg(const DecodeArgs& a, const SharedTiles& sm, int q_rows, int load_by_cp_async, int tid) {
    const int warp = tid / 32, lane = tid % 32;
    const int row0 = warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
    const SmemOperand<> q_tile(smem_addr(sm.q()));
    const int q_stride = q_chunk_stride(q_rows);
    int it = 0, pieces = 0;
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        const bool has_pages = piece.page_end > piece.page_begin;
        const int seqlen = a.seqlens[req];
        if (has_pages) stage_q_block(a, sm, q_rows, req, tid, true, pieces);

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
            const int left = sm.v_ring.slot(2 * it), right = sm.v_ring.slot(2 * it + 1);
            const int rslot = sm.rope_ring.slot(it), pslot = it % P_SLOTS;
            uint8_t* const left_tile = sm.half(left);
            uint8_t* const right_tile = sm.half(right);
            uint8_t* const rope_tile = sm.rope(rslot);

            // S = Q K^T, each part of the page as it lands: chunks 0-3 (left), 4-7 (right), 8 (rope).
            float s[32];
#pragma unroll
            for (int i = 0; i < 32; ++i) s[i] = 0.f;
            wait_part(sm.full_half(left), sm.v_ring.parity(2 * it), load_by_cp_async);
            wgmma_fence();
#pragma unroll
            for (int c = 0; c < QK_CHUNKS; ++c) {
                if (c == HALF_CHUNKS) wait_part(sm.full_half(right), sm.v_ring.parity(2 * it + 1), load_by_cp_async);
                if (c == ROPE_CHUNK) wait_part(sm.full_rope(rslot), sm.rope_ring.parity(it), load_by_cp_async);
                uint8_t* const chunk = c < HALF_CHUNKS ? left_tile + c * CHUNK_BYTES
                                     : c < ROPE_CHUNK ? right_tile + (c - HALF_CHUNKS) * CHUNK_BYTES
                                                      : rope_tile;
                const SmemOperand<> k_chunk(smem_addr(chunk));
#pragma unroll
                for (int k = 0; k < CHUNK_COLS / K_STEP; ++k)
                    wgmma_m64n64k16_ss(s, q_tile.at(c * q_stride + k * K_STEP * 2), k_chunk.at(k * K_STEP * 2),
                                       (c | k) != 0);
            }
            wgmma_commit();
            wgmma_wait<0>();
            fence_accumulators(s);

            const int tok0 = page * PAGE_SIZE;
            if (tok0 + PAGE_SIZE > min_limit) {
#pragma unroll
                for (int i = 0; i < 32; ++i)
                    if (tok0 + frag_col(i, lane) >= limit[(i >> 1) & 1]) s[i] = NEG_INF;
            }
            if (tok0 + PAGE_SIZE > seqlen) {
                zero_half_tail(left_tile, seqlen - tok0, tid);
                zero_half_tail(right_tile, seqlen - tok0, tid);
                fence_proxy_async_smem();
                named_barrier_sync(BAR_WG0, WG_THREADS);  // every thread's zeroes, before the P V wgmma
            }

            float alpha[2];
            online_softmax_page(s, row_max, row_sum, alpha, a.scale_log2);

            uint32_t p[16];
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int half = 0; half < 2; ++half)
                    p[2 * n + half] = pack_half2(s[4 * n + 2 * half], s[4 * n + 2 * half + 1]);

            rescale_rows_if_needed(o, alpha[0], alpha[1]);
            const SmemOperand<CHUNK_BYTES> v_left(smem_addr(left_tile));
            wgmma_fence();
#pragma unroll
            for (int k = 0; k < PAGE_SIZE / K_STEP; ++k)
                wgmma_m64n256k16_rs_bt(o, p[4 * k], p[4 * k + 1], p[4 * k + 2], p[4 * k + 3],
                                       v_left.at(k * K_STEP * 128));
            wgmma_commit();

            // While that runs: P into this page's rope slot, and the row scales, for warpgroup 1.
            store_p_by_stmatrix(smem_addr(rope_tile), p, warp, lane);
            if (lane % 4 == 0) {
                sm.row_scale(pslot)[row0] = alpha[0];
                sm.row_scale(pslot)[row0 + 8] = alpha[1];
            }
            fence_proxy_async_smem();
            mbarrier_arrive(sm.handoff_bar(HB_P_READY + pslot));
            wgmma_wait<0>();
            fence_accumulators(o);
            fence_fragments(p);
            mbarrier_arrive(sm.empty_half(left));  // the left half's last reader is done
        }

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
    }
}

// Warpgroup 1: the right half of O, behind warpgroup 0's scores; frees the right half and the
// rope slot (which held P) of each page.
DEVICE void run_pv_wg(const DecodeArgs& a, const SharedTiles& sm, int q_rows, int load_by_cp_async, int tid) {
    const int warp = tid / 32, lane = tid % 32;
    const int row0 = warp * 16 + lane / 4;
    int it = 0, pieces = 0;
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        const bool has_pages = piece.page_end > piece.page_begin;
        if (has_pages) stage_q_block(a, sm, q_rows, req, WG_THREADS + tid, false, pieces);
        float o[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.f;
        for (int page = piece.page_begin; page < piece.page_end; ++page, ++it) {
            const int pslot = it % P_SLOTS;
            const int right = sm.v_ring.slot(2 * it + 1), rslot = sm.rope_ring.slot(it);
            mbarrier_wait(sm.handoff_bar(HB_P_READY + pslot), (uint32_t)(it / P_SLOTS) & 1u);
            // The right half came by cp.async (generic proxy): this thread's view, to the async
            // proxy, before its wgmma read it (warpgroup 0 fenced its own after the full wait).
            if (load_by_cp_async) fence_proxy_async_smem();
            rescale_rows_if_needed(o, sm.row_scale(pslot)[row0], sm.row_scale(pslot)[row0 + 8]);
            pv_gemm(o, smem_addr(sm.rope(rslot)), smem_addr(sm.half(right)));
            mbarrier_arrive(sm.empty_half(right));
            mbarrier_arrive(sm.empty_rope(rslot));
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
}

// The same arguments as the shipped decode (kernels/mla_decode.cu).
extern "C" __global__ void __launch_bounds__(DECODE_THREADS, 1)
mla_decode(const __grid_constant__ TensorMap kv_map, const uint16_t* __restrict__ q,
           long long q_stride_b, long long q_stride_s, long long q_stride_h,
           const int* __restrict__ block_table, long long bt_stride,
           const int* __restrict__ seqlens, const int* __restrict__ metadata,
           const int* __restrict__ num_splits, uint16_t* __restrict__ out,
           float* __restrict__ lse, float* __restrict__ o_part, float* __restrict__ lse_part,
           int s_q, int h_q, int h_k, int causal, float scale_log2, int kv_evict_first,
           const uint16_t* __restrict__ k_cache, long long kv_page_stride, long long kv_token_stride,
           int load_by_cp_async) {
    extern __shared__ uint8_t smem_raw[];
    uint8_t* const base = smem_raw + (SMEM_ALIGN - smem_addr(smem_raw) % SMEM_ALIGN) % SMEM_ALIGN;

    DecodeArgs a = gather_decode_args(&kv_map, q, q_stride_b, q_stride_s, q_stride_h, block_table, bt_stride,
                                      seqlens, num_splits, out, lse, o_part, lse_part, s_q, h_q, h_k, causal,
                                      scale_log2, kv_evict_first);
    // One layout per launch: every CTA of it has the same rows.
    const int q_rows = a.rows.rows <= 16 ? 16 : a.rows.rows <= 32 ? 32 : BLOCK_M;
    const SharedTiles sm = shared_tiles(base, q_rows);
#ifdef MLA_PROGRAMMATIC_LAUNCH
    if (!DEPENDENTS_AFTER_FIRST_ISSUE) allow_dependent_launch();
    grid_dependency_wait();
#endif
    a.work = load_part(metadata, blockIdx.z);
    if (a.work.end_req < a.work.begin_req) return;  // idle part (the whole CTA)

    const int tid = threadIdx.x;
    if (tid == 0) init_ring_barriers(sm, load_by_cp_async);
    if (q_rows < BLOCK_M && tid < CONSUMER_THREADS) {
        // The zeros that the garbage rows of Q's last chunks read, by the math threads: each
        // fences them to the async proxy with its first Q load (stage_q_block), before HB_Q_READY.
        for (int idx = tid; idx < (BLOCK_M - q_rows) * 128 / 16; idx += CONSUMER_THREADS)
            reinterpret_cast<uint4*>(sm.q() + QK_CHUNKS * q_chunk_stride(q_rows))[idx] = make_uint4(0, 0, 0, 0);
    }
    __syncthreads();

    const int wg = tid / WG_THREADS;
    if (wg == 2) {
        setmaxnreg_dec_40();
        if (load_by_cp_async)
            run_cp_async_producer(a, sm, k_cache, kv_page_stride, kv_token_stride, tid - 2 * WG_THREADS);
        else if (tid == 2 * WG_THREADS)
            run_tma_producer(a, sm);
    } else if (wg == 0) {
        setmaxnreg_inc_240();
        run_softmax_wg(a, sm, q_rows, load_by_cp_async, tid);
    } else {
        setmaxnreg_inc_224();
        run_pv_wg(a, sm, q_rows, load_by_cp_async, tid - WG_THREADS);
    }
}
