// EXPERIMENT v31a (NOTES.md "v31 plan"; written 2026-12-02, ninth session, not yet run): the
// shipped decode with the KV ring refilled by its consumers instead of a producer warpgroup.
// A stage's chunks 0-3 (V's left half and K's first 256 columns) are read last by warpgroup 0's
// P V, so warpgroup 0 refills them right after it; chunks 4-8 (V's right half, and the rope chunk
// that carries P) are read last by warpgroup 1's P V, which refills them. Each group has its own
// full mbarrier per stage, so the scores start on chunks 0-3 before chunks 4-8 land, and there are
// no empty barriers: the refill is issued by the last reader after its own wgmma wait. The
// producer warpgroup only gives its registers back and exits. TMA only (no cp.async producer).
// The step toward a balanced seesaw (v31), which needs refills by the consumers.
#include "mla_decode_shared.cuh"
#include "mla_softmax.cuh"

constexpr int KV_STAGES = 2;

#ifndef Q_ROPE_IN_REGISTERS
#define Q_ROPE_IN_REGISTERS 0       // Q's rope chunk as the A operand of its 4 score wgmma, from registers (v30)
#endif
constexpr int SOFTMAX_WG_REGS = 240;
constexpr int PV_WG_REGS = 224;
constexpr int PRODUCER_WG_REGS = 40;
static_assert(WG_THREADS * (SOFTMAX_WG_REGS + PV_WG_REGS + PRODUCER_WG_REGS) <=
                  DECODE_THREADS * LAUNCH_REGS_PER_THREAD,
              "register split exceeds the registers the CTA is launched with");

// TMA only: the API passes no cache pointer and no producer choice.
constexpr bool TAKES_KV_POINTER = false;
constexpr bool SELECTS_KV_PRODUCER = false;

// The two refill groups of a stage: chunks [0, GROUP_A_CHUNKS) by warpgroup 0, the rest by
// warpgroup 1 (see the header).
constexpr int GROUP_A_CHUNKS = V_COLS_PER_WG / CHUNK_COLS;      // 4
constexpr int GROUP_B_CHUNKS = QK_CHUNKS - GROUP_A_CHUNKS;      // 5

// Hand-off mbarriers between the math warpgroups (index into SharedTiles::handoff_bar()).
constexpr int HB_Q_READY = 0;    // both WGs copied Q       (256 arrivals, WG0 waits)
constexpr int HB_STATS = 1;      // WG0 stored row max/sum  (128 arrivals, WG1 waits)
constexpr int HB_P_READY = 2;    // + stage: WG0 stored P and scales of that stage (128 arrivals)
constexpr int HANDOFF_BARRIERS = 2 + KV_STAGES;
constexpr int ROPE_CHUNK = QK_CHUNKS - 1;  // a page's chunk that holds its P after its scores
// Score chunks whose Q operand is read from shared memory (the rest from registers, v30).
constexpr int QK_SMEM_Q_CHUNKS = Q_ROPE_IN_REGISTERS ? QK_CHUNKS - 1 : QK_CHUNKS;
// Named barriers (0 is __syncthreads).
constexpr int BAR_WG0 = 2;       // WG0's V-tail zeroes, before its P V wgmma
constexpr int BAR_WG0_DONE = 3;  // WG0's P V retired in every warp, before its refill
constexpr int BAR_WG1_DONE = 4;  // WG1's P V retired in every warp, before its refill

// Shared memory map (byte offsets from a 1024-aligned base).
constexpr int SMEM_Q = 0;
constexpr int SMEM_KV = TILE_BYTES;
constexpr int SMEM_ROW_SCALE = SMEM_KV + KV_STAGES * TILE_BYTES;
constexpr int SMEM_ROW_MAX = SMEM_ROW_SCALE + KV_STAGES * BLOCK_M * 4;  // row_scale: one per stage
constexpr int SMEM_ROW_SUM = SMEM_ROW_MAX + BLOCK_M * 4;
constexpr int SMEM_BARRIERS = SMEM_ROW_SUM + BLOCK_M * 4;
constexpr int SMEM_USED = SMEM_BARRIERS + (2 * KV_STAGES + HANDOFF_BARRIERS) * 8;  // full A, full B per stage
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
    DEVICE uint64_t* full_a_bar() const { return reinterpret_cast<uint64_t*>(base + SMEM_BARRIERS); }
    DEVICE uint64_t* full_b_bar() const { return full_a_bar() + KV_STAGES; }
    DEVICE uint64_t* handoff_bar(int which) const { return full_a_bar() + 2 * KV_STAGES + which; }
};

DEVICE void setmaxnreg_inc_240() { asm volatile("setmaxnreg.inc.sync.aligned.u32 240;"); }
DEVICE void setmaxnreg_inc_224() { asm volatile("setmaxnreg.inc.sync.aligned.u32 224;"); }
DEVICE void setmaxnreg_dec_40() { asm volatile("setmaxnreg.dec.sync.aligned.u32 40;"); }

// The next page to load, in ring order (every page of every piece of the part): each refilling
// thread walks its own copy, one page per refill, so both groups see the same sequence. The page
// id is loaded one refill ahead: a block-table read waited on at the refill would hold up the
// whole math warpgroup for a memory round trip (the shipped producer does the same, v25).
struct RingCursor {
    int req, page, page_end, page_id;
    bool valid;  // false past the part's last page
};

// Moves to the next page of the walk and starts loading its id.
DEVICE void ring_step(const DecodeArgs& a, RingCursor& c) {
    ++c.page;
    while (c.page >= c.page_end) {
        if (++c.req > a.work.end_req) {
            c.valid = false;
            return;
        }
        const Piece piece = piece_of(a.work, c.req, a.seqlens, a.num_splits);
        c.page = piece.page_begin;
        c.page_end = piece.page_end;
    }
    c.page_id = a.block_table[(size_t)c.req * a.bt_stride + c.page];
    c.valid = true;
}

DEVICE RingCursor ring_start(const DecodeArgs& a) {
    RingCursor c{a.work.begin_req - 1, 0, 0, 0, false};
    ring_step(a, c);
    return c;
}

// One refill group of a page into a stage by TMA, from one thread: chunks [first, first + count).
DEVICE void load_chunk_group(const DecodeArgs& a, const SharedTiles& sm, int stage, int page_id, int first,
                             int count, uint64_t* bar) {
    // One query block streams each page once; several blocks re-read it from L2.
    const uint64_t policy = a.kv_evict_first ? l2_policy_evict_first() : l2_policy_evict_last();
    mbarrier_arrive_expect_tx(bar, count * CHUNK_BYTES);
    for (int c = first; c < first + count; ++c)
        tma_load_4d(sm.kv(stage) + c * CHUNK_BYTES, a.kv_map, bar, c * CHUNK_COLS, a.kh, 0, page_id, policy);
}

// The refill group a warpgroup owns (0: chunks 0-3, 1: chunks 4-8) of the cursor's next page,
// into `stage`, if the part has one. Called by one thread after its warpgroup's last read of the
// stage's group (and a warpgroup barrier, so that every warp's wgmma has retired).
DEVICE void refill_group(const DecodeArgs& a, const SharedTiles& sm, RingCursor& cursor, int group, int stage) {
    if (!cursor.valid) return;
    if (group == 0)
        load_chunk_group(a, sm, stage, cursor.page_id, 0, GROUP_A_CHUNKS, &sm.full_a_bar()[stage]);
    else
        load_chunk_group(a, sm, stage, cursor.page_id, GROUP_A_CHUNKS, GROUP_B_CHUNKS, &sm.full_b_bar()[stage]);
    ring_step(a, cursor);  // the next id's load overlaps the page in between
}

// The refilling thread's cursor, after filling both stages' `group` with the part's first two
// pages; the other threads' cursors are unused.
DEVICE RingCursor start_refills(const DecodeArgs& a, const SharedTiles& sm, int group, bool refiller) {
    RingCursor cursor{};
    if (refiller) {
        cursor = ring_start(a);
        for (int stage = 0; stage < KV_STAGES; ++stage) refill_group(a, sm, cursor, group, stage);
    }
    return cursor;
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

// Byte offset, in a 128B-swizzled 64-column chunk, of the 16-bit pair (row r, columns
// 8n + 2(lane%4) and +1): register 2n + half of the k16 A-fragment layout for rows row0 and
// row0 + 8 (the layout of P in registers).
DEVICE int a_fragment_pair_offset(int r, int n, int lane) { return r * 128 + ((n ^ (r & 7)) << 4) + (lane % 4) * 4; }

// A 64-column chunk (4 k16 slices) as A fragments: f[4k .. 4k + 3] feed the RS wgmma of slice k.
DEVICE void load_a_fragments(uint32_t (&f)[16], const uint8_t* chunk, int row0, int lane) {
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int half = 0; half < 2; ++half)
            f[2 * n + half] = *reinterpret_cast<const uint32_t*>(chunk + a_fragment_pair_offset(row0 + 8 * half, n, lane));
}

// Warpgroup 0: scores, softmax, P, and the left half of O.
DEVICE void run_softmax_wg(const DecodeArgs& a, const SharedTiles& sm, int tid) {
    const int warp = tid / 32, lane = tid % 32;
    const int row0 = warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
    const SmemOperand<> q_tile(smem_addr(sm.q()));
    RingCursor cursor = start_refills(a, sm, 0, tid == 0);
    int it = 0, pieces = 0;
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        const bool has_pages = piece.page_end > piece.page_begin;
        const int seqlen = a.seqlens[req];
        if (has_pages) stage_q_block(a, sm, req, tid, true, pieces);
        uint32_t q_rope[16];  // Q's rope chunk as A fragments (Q_ROPE_IN_REGISTERS): 8 KB less smem read per page
        if (Q_ROPE_IN_REGISTERS && has_pages) load_a_fragments(q_rope, sm.q() + ROPE_CHUNK * CHUNK_BYTES, row0, lane);

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
            mbarrier_wait(&sm.full_a_bar()[stage], (it / KV_STAGES) & 1);

            float s[32];
#pragma unroll
            for (int i = 0; i < 32; ++i) s[i] = 0.f;
            wgmma_fence();
#pragma unroll
            for (int c = 0; c < QK_SMEM_Q_CHUNKS; ++c) {
                // Chunks 0-3 are issued on the first group; the rest wait for the second.
                if (c == GROUP_A_CHUNKS) {
                    mbarrier_wait(&sm.full_b_bar()[stage], (it / KV_STAGES) & 1);
                    wgmma_fence();  // the wait's registers, before the accumulating wgmma go on
                }
#pragma unroll
                for (int k = 0; k < CHUNK_COLS / K_STEP; ++k)
                    wgmma_m64n64k16_ss(s, q_tile.at(c * CHUNK_BYTES + k * K_STEP * 2),
                                       kv_tile_k.at(c * CHUNK_BYTES + k * K_STEP * 2), (c | k) != 0);
            }
            if (Q_ROPE_IN_REGISTERS) {
#pragma unroll
                for (int k = 0; k < CHUNK_COLS / K_STEP; ++k)
                    wgmma_m64n64k16_rs(s, q_rope[4 * k], q_rope[4 * k + 1], q_rope[4 * k + 2], q_rope[4 * k + 3],
                                       kv_tile_k.at(ROPE_CHUNK * CHUNK_BYTES + k * K_STEP * 2), 1);
            }
            wgmma_commit();
            wgmma_wait<0>();
            fence_accumulators(s);
            if (Q_ROPE_IN_REGISTERS) fence_fragments(q_rope);  // read by the wgmma until the wait

            const int tok0 = page * PAGE_SIZE;
            if (tok0 + PAGE_SIZE > min_limit) {
#pragma unroll
                for (int i = 0; i < 32; ++i)
                    if (tok0 + frag_col(i, lane) >= limit[(i >> 1) & 1]) s[i] = NEG_INF;
            }
            if (tok0 + PAGE_SIZE > seqlen) {
                zero_v_tail(kv_tile, seqlen - tok0, tid);
                fence_proxy_async_smem();
                named_barrier_sync(BAR_WG0, WG_THREADS);  // every thread's zeroes, before the P V wgmma
            }

            float alpha[2];
            online_softmax_page(s, row_max, row_sum, alpha, a.scale_log2);

            // P as packed 16-bit pairs: p[2n + half] holds row row0 + 8 half, columns 8n + 2(lane%4)
            // and +1, which is also the A-fragment layout of the k16 slice n / 2.
            uint32_t p[16];
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int half = 0; half < 2; ++half)
                    p[2 * n + half] = pack_half2(s[4 * n + 2 * half], s[4 * n + 2 * half + 1]);

            rescale_rows_if_needed(o, alpha[0], alpha[1]);
            wgmma_fence();
#pragma unroll
            for (int k = 0; k < PAGE_SIZE / K_STEP; ++k)
                wgmma_m64n256k16_rs_bt(o, p[4 * k], p[4 * k + 1], p[4 * k + 2], p[4 * k + 3],
                                       kv_tile_v.at(k * K_STEP * 128));
            wgmma_commit();

            // While that runs: P (into this page's rope chunk) and the row scales for warpgroup 1.
            // The address is a_fragment_pair_offset's, written out: through the call, ptxas
            // spilled 12 bytes in this warpgroup (v30).
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int r = row0 + 8 * half;
                    *reinterpret_cast<uint32_t*>(sm.p(stage) + r * 128 + ((n ^ (r & 7)) << 4) + (lane % 4) * 4) =
                        p[2 * n + half];
                }
            if (lane % 4 == 0) {
                sm.row_scale(stage)[row0] = alpha[0];
                sm.row_scale(stage)[row0 + 8] = alpha[1];
            }
            fence_proxy_async_smem();
            mbarrier_arrive(sm.handoff_bar(HB_P_READY + stage));
            wgmma_wait<0>();
            fence_accumulators(o);
            fence_fragments(p);  // the P V wgmma read p until the wait
            // Chunks 0-3 are read by nothing else: warpgroup 0 refills them with the page two on.
            named_barrier_sync(BAR_WG0_DONE, WG_THREADS);
            if (tid == 0) refill_group(a, sm, cursor, 0, stage);
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

// Warpgroup 1: the right half of O, one page behind warpgroup 0's scores.
DEVICE void run_pv_wg(const DecodeArgs& a, const SharedTiles& sm, int tid) {
    const int warp = tid / 32, lane = tid % 32;
    const int row0 = warp * 16 + lane / 4;
    constexpr int RIGHT_HALF_BYTES = (V_COLS_PER_WG / CHUNK_COLS) * CHUNK_BYTES;
    RingCursor cursor = start_refills(a, sm, 1, tid == 0);
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
            rescale_rows_if_needed(o, sm.row_scale(stage)[row0], sm.row_scale(stage)[row0 + 8]);
            pv_gemm(o, smem_addr(sm.p(stage)), smem_addr(sm.kv(stage)) + RIGHT_HALF_BYTES);
            // Warpgroup 0 finished this page's scores before P was ready: chunks 4-8 are free.
            named_barrier_sync(BAR_WG1_DONE, WG_THREADS);
            if (tid == 0) refill_group(a, sm, cursor, 1, stage);
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
    // Launched programmatically behind the stream's previous kernel (the scheduler, or whatever
    // wrote q, the cache or the block table): this CTA's launch and setup overlapped its tail;
    // every global read comes after this wait.
    grid_dependency_wait();
#endif
    a.work = load_part(metadata, blockIdx.z);
    if (a.work.end_req < a.work.begin_req) return;  // idle part

    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < KV_STAGES; ++s) {
            mbarrier_init(&sm.full_a_bar()[s], 1);  // the refilling thread's expect_tx
            mbarrier_init(&sm.full_b_bar()[s], 1);
        }
        mbarrier_init(sm.handoff_bar(HB_Q_READY), CONSUMER_THREADS);
        for (int s = 0; s < KV_STAGES; ++s) mbarrier_init(sm.handoff_bar(HB_P_READY + s), WG_THREADS);
        mbarrier_init(sm.handoff_bar(HB_STATS), WG_THREADS);
        fence_barrier_init();
    }
    __syncthreads();

    const int wg = tid / WG_THREADS;
    if (wg == 2) {
        setmaxnreg_dec_40();  // no producer: its registers go to the math warpgroups
    } else if (wg == 0) {
        setmaxnreg_inc_240();
        run_softmax_wg(a, sm, tid);
    } else {
        setmaxnreg_inc_224();
        run_pv_wg(a, sm, tid - WG_THREADS);
    }
}
