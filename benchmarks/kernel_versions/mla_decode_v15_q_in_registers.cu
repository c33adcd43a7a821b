// EXPERIMENT v15 (NOTES.md "v15"; not yet run): a restructured decode for the shared-memory
// reading of v14. Q leaves shared memory for good, which frees a third KV stage, and the P V of
// a page waits until the next page's scores are done, so the softmax overlaps tensor work.
//
// Warpgroup roles (384 threads; setmaxnreg moves registers to the scores warpgroup):
//   warpgroup 0 (scores): the whole Q block in registers as wgmma A fragments (144), S = Q K^T
//                         with A from registers, masking, online softmax, P into the page's
//                         own rope chunk (free once its scores are done)              200 regs
//   warpgroup 1 (P V):    O[:, 0:256] += P V, writes the output and LSE                152 regs
//   warpgroup 2 (P V):    O[:, 256:512] += P V, writes the output; one of its threads
//                         also streams the pages by TMA into the three-stage ring     152 regs
// Per page and 64-row block the shared-memory port no longer carries Q (72 KB of ~296 KB).
//
// Order per page it: scores(it) done -> P(it - 1) published (P_READY of its stage) ->
// softmax(it) -> P(it) written. So P V(it - 1) by warpgroups 1 and 2 runs on the tensor pipe
// while warpgroup 0 does softmax(it), and scores(it + 1) follow. A stage is held from its load
// until both P V warpgroups are done with it (two pages); the third stage is loading meanwhile.
// The row scales and a piece's final row stats go in per-stage slots, read before the stage is
// released, so the KV ring's mbarriers order their reuse.
#include "mla_decode_shared.cuh"

constexpr int KV_STAGES = 3;
constexpr int SCORES_WG_REGS = 200;
constexpr int PV_WG_REGS = 152;
static_assert(WG_THREADS * (SCORES_WG_REGS + 2 * PV_WG_REGS) <= DECODE_THREADS * LAUNCH_REGS_PER_THREAD,
              "register split exceeds the registers the CTA is launched with");
constexpr int Q_SLICES = HEAD_DIM_QK / K_STEP;          // 36 k16 slices of Q
constexpr int SLICES_PER_CHUNK = CHUNK_COLS / K_STEP;   // 4
constexpr int ROPE_CHUNK = QK_CHUNKS - 1;               // the page's chunk that holds P later
constexpr int PV_THREADS = 2 * WG_THREADS;

// Shared memory map (byte offsets from a 1024-aligned base): the ring, then per-stage row data.
constexpr int SMEM_KV = 0;
constexpr int SMEM_ROW_SCALE = SMEM_KV + KV_STAGES * TILE_BYTES;
constexpr int SMEM_ROW_LSE = SMEM_ROW_SCALE + KV_STAGES * BLOCK_M * 4;
constexpr int SMEM_ROW_SUM = SMEM_ROW_LSE + KV_STAGES * BLOCK_M * 4;
constexpr int SMEM_BARRIERS = SMEM_ROW_SUM + KV_STAGES * BLOCK_M * 4;
constexpr int SMEM_USED = SMEM_BARRIERS + 3 * KV_STAGES * 8;
constexpr int SMEM_ALIGN = 1024;
constexpr int DECODE_SMEM_BYTES = SMEM_USED + SMEM_ALIGN;
static_assert(DECODE_SMEM_BYTES <= 227 * 1024, "decode tile does not fit in shared memory");
#ifdef MLA_LAUNCH_SMEM_BYTES
static_assert(DECODE_SMEM_BYTES <= MLA_LAUNCH_SMEM_BYTES, "the launch reserves less shared memory than this map needs");
#endif

struct SharedTiles {
    uint8_t* base;
    DEVICE uint8_t* kv(int stage) const { return base + SMEM_KV + stage * TILE_BYTES; }
    DEVICE uint8_t* p(int stage) const { return kv(stage) + ROPE_CHUNK * CHUNK_BYTES; }
    DEVICE float* row_scale(int stage) const { return reinterpret_cast<float*>(base + SMEM_ROW_SCALE) + stage * BLOCK_M; }
    DEVICE float* row_lse(int stage) const { return reinterpret_cast<float*>(base + SMEM_ROW_LSE) + stage * BLOCK_M; }
    DEVICE float* row_sum(int stage) const { return reinterpret_cast<float*>(base + SMEM_ROW_SUM) + stage * BLOCK_M; }
    DEVICE uint64_t* full_bar(int stage) const { return reinterpret_cast<uint64_t*>(base + SMEM_BARRIERS) + stage; }
    DEVICE uint64_t* empty_bar(int stage) const { return full_bar(0) + KV_STAGES + stage; }
    DEVICE uint64_t* p_ready_bar(int stage) const { return full_bar(0) + 2 * KV_STAGES + stage; }
};

template <int N>
DEVICE void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N)); }
template <int N>
DEVICE void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N)); }

// ---------------------------------------------------------------------------------------
// Producer (one thread of warpgroup 2): the next tile to load, walking the part's pieces.
struct TileLoader {
    int req, page, page_end;  // req > work.end_req: nothing left
    uint64_t policy;
};

DEVICE void loader_next_piece(TileLoader& l, const DecodeArgs& a) {
    for (++l.req; l.req <= a.work.end_req; ++l.req) {
        const Piece piece = piece_of(a.work, l.req, a.seqlens, a.num_splits);
        if (piece.page_end > piece.page_begin) {
            l.page = piece.page_begin;
            l.page_end = piece.page_end;
            return;
        }
    }
}

DEVICE TileLoader loader_start(const DecodeArgs& a) {
    TileLoader l{a.work.begin_req - 1, 0, 0,
                 a.kv_evict_first ? l2_policy_evict_first() : l2_policy_evict_last()};
    loader_next_piece(l, a);
    return l;
}

// Loads the loader's next tile (if any) into a free stage.
DEVICE void load_next_tile(TileLoader& l, const DecodeArgs& a, const SharedTiles& sm, int stage) {
    if (l.req > a.work.end_req) return;
    mbarrier_arrive_expect_tx(sm.full_bar(stage), TILE_BYTES);
    const int page_id = a.block_table[(size_t)l.req * a.bt_stride + l.page];
#pragma unroll
    for (int c = 0; c < QK_CHUNKS; ++c)
        tma_load_4d(sm.kv(stage) + c * CHUNK_BYTES, a.kv_map, sm.full_bar(stage), c * CHUNK_COLS, a.kh, 0,
                    page_id, l.policy);
    if (++l.page == l.page_end) loader_next_piece(l, a);
}

// ---------------------------------------------------------------------------------------
// Warpgroup 0.
// This warp's A fragments of every k16 slice of the Q block, from global memory (zeros for
// rows past the end): q[slice] = rows (g, g + 8) x columns (2t, 2t + 8) of the slice, as the
// mma A layout wants them (g = lane / 4, t = lane % 4).
DEVICE void load_q_fragments(uint32_t (&q)[Q_SLICES][4], const DecodeArgs& a, int req, int warp, int lane) {
    const uint32_t* row_ptr[2];
    bool valid[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int grow = a.row_base + warp * 16 + lane / 4 + 8 * half;
        valid[half] = grow < a.rows.rows;
        row_ptr[half] = reinterpret_cast<const uint32_t*>(
            a.q + (valid[half] ? req * a.q_stride_b + a.rows.s_idx(grow) * a.q_stride_s +
                                     a.rows.head(grow, a.kh) * a.q_stride_h
                               : 0));
    }
#pragma unroll
    for (int slice = 0; slice < Q_SLICES; ++slice)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int word = slice * K_STEP / 2 + lane % 4;  // 32-bit word of columns 2t, 2t + 1
            q[slice][half] = valid[half] ? __ldg(row_ptr[half] + word) : 0u;
            q[slice][2 + half] = valid[half] ? __ldg(row_ptr[half] + word + 4) : 0u;
        }
}

DEVICE void run_scores_wg(const DecodeArgs& a, const SharedTiles& sm, int tid) {
    const int warp = tid / 32, lane = tid % 32;
    const int row0 = warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
    int it = 0, published_stage = -1;       // the stage whose P waits for publication
    uint32_t q[Q_SLICES][4];
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        if (piece.page_end <= piece.page_begin) continue;  // the P V warpgroups write its output
        const int seqlen = a.seqlens[req];
        load_q_fragments(q, a, req, warp, lane);

        int limit[2];  // key limit of each of this thread's rows (bottom-right causal alignment)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int grow = a.row_base + row0 + 8 * half;
            limit[half] = (a.causal && grow < a.rows.rows) ? seqlen - (a.s_q - 1 - a.rows.s_idx(grow)) : seqlen;
        }
        const int min_limit = a.causal ? seqlen - (a.s_q - 1) : seqlen;
        float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.f, 0.f};

        for (int page = piece.page_begin; page < piece.page_end; ++page, ++it) {
            const int stage = it % KV_STAGES;
            uint8_t* kv_tile = sm.kv(stage);
            const uint32_t kv_addr = smem_addr(kv_tile);
            mbarrier_wait(sm.full_bar(stage), (it / KV_STAGES) & 1);

            float s[32];
#pragma unroll
            for (int i = 0; i < 32; ++i) s[i] = 0.f;
            wgmma_fence();
#pragma unroll
            for (int slice = 0; slice < Q_SLICES; ++slice)
                wgmma_m64n64k16_rs(s, q[slice][0], q[slice][1], q[slice][2], q[slice][3],
                                   desc_k_major(kv_addr + (slice / SLICES_PER_CHUNK) * CHUNK_BYTES +
                                                (slice % SLICES_PER_CHUNK) * K_STEP * 2),
                                   slice != 0);
            wgmma_commit();
            wgmma_wait<0>();
            fence_accumulators(s);

            // The previous page's P V may start now: its tensor work overlaps this softmax.
            if (published_stage >= 0) mbarrier_arrive(sm.p_ready_bar(published_stage));

            const int tok0 = page * PAGE_SIZE;
            if (tok0 + PAGE_SIZE > min_limit) {
#pragma unroll
                for (int i = 0; i < 32; ++i)
                    if (tok0 + frag_col(i, lane) >= limit[(i >> 1) & 1]) s[i] = NEG_INF;
            }
            if (tok0 + PAGE_SIZE > seqlen) zero_v_tail(kv_tile, seqlen - tok0, tid);

            // Online softmax in the log2 domain; row sums stay per-thread until the piece ends.
            float alpha[2];
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                float mx = NEG_INF;
#pragma unroll
                for (int i = 0; i < 32; ++i)
                    if (((i >> 1) & 1) == half) mx = fmaxf(mx, s[i]);
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(row_max[half], mx * a.scale_log2);
                const float m_use = m_new == NEG_INF ? 0.f : m_new;
                alpha[half] = exp2f(row_max[half] - m_use);
                row_max[half] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int i = 0; i < 32; ++i)
                    if (((i >> 1) & 1) == half) {
                        s[i] = exp2f(s[i] * a.scale_log2 - m_use);
                        sum += s[i];
                    }
                row_sum[half] = row_sum[half] * alpha[half] + sum;
            }

            // P into the page's rope chunk (its scores are done), 128B-swizzled like a K chunk.
            uint8_t* p_tile = sm.p(stage);
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int r = row0 + 8 * half;
                    *reinterpret_cast<uint32_t*>(p_tile + r * 128 + ((n ^ (r & 7)) << 4) + (lane % 4) * 4) =
                        pack_half2(s[4 * n + 2 * half], s[4 * n + 2 * half + 1]);
                }
            const bool piece_ends = page + 1 == piece.page_end;
            float total[2] = {row_sum[0], row_sum[1]};
            if (piece_ends) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    total[half] += __shfl_xor_sync(0xffffffffu, total[half], 1);
                    total[half] += __shfl_xor_sync(0xffffffffu, total[half], 2);
                }
            }
            if (lane % 4 == 0) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    sm.row_scale(stage)[row0 + 8 * half] = alpha[half];
                    if (piece_ends) {  // the final row stats, for the P V warpgroups' stores
                        sm.row_sum(stage)[row0 + 8 * half] = total[half];
                        sm.row_lse(stage)[row0 + 8 * half] = (row_max[half] + log2f(total[half])) * LN2;
                    }
                }
            }
            fence_proxy_async_smem();  // P and the zeroed V tail, before the P V wgmma reads them
            published_stage = stage;
        }
    }
    if (published_stage >= 0) mbarrier_arrive(sm.p_ready_bar(published_stage));
}

// ---------------------------------------------------------------------------------------
// Warpgroups 1 and 2: one half of O each; warpgroup 2's first thread also feeds the ring.
DEVICE void run_pv_wg(const DecodeArgs& a, const SharedTiles& sm, int tid, int half, bool producer) {
    const int warp = tid / 32, lane = tid % 32;
    const int row0 = warp * 16 + lane / 4;
    const int v_offset = half * (V_COLS_PER_WG / CHUNK_COLS) * CHUNK_BYTES;
    TileLoader loader{};
    if (producer) {
        loader = loader_start(a);
        for (int s = 0; s < KV_STAGES; ++s) load_next_tile(loader, a, sm, s);
    }
    int it = 0;
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        float o[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.f;
        float row_sum[2] = {0.f, 0.f}, row_lse[2] = {0.f, 0.f};
        for (int page = piece.page_begin; page < piece.page_end; ++page, ++it) {
            const int stage = it % KV_STAGES;
            mbarrier_wait(sm.p_ready_bar(stage), (it / KV_STAGES) & 1);
            const float scale0 = sm.row_scale(stage)[row0], scale1 = sm.row_scale(stage)[row0 + 8];
            if (page + 1 == piece.page_end) {  // read before the stage is released
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    row_sum[h] = sm.row_sum(stage)[row0 + 8 * h];
                    row_lse[h] = sm.row_lse(stage)[row0 + 8 * h];
                }
            }
            rescale_rows(o, scale0, scale1);
            pv_gemm(o, smem_addr(sm.p(stage)), smem_addr(sm.kv(stage)) + v_offset);
            mbarrier_arrive(sm.empty_bar(stage));
            if (producer) {  // both halves done with this stage: refill it with the tile 3 ahead
                mbarrier_wait(sm.empty_bar(stage), (it / KV_STAGES) & 1);
                load_next_tile(loader, a, sm, stage);
            }
        }
        store_output(o, row_sum, row_lse, half * V_COLS_PER_WG, warp, lane, piece, a.kh, a.row_base, a.rows,
                     a.s_q, a.h_q, a.h_k, a.out, a.lse, a.o_part, a.lse_part, half == 0);
    }
}

// Same arguments and grid as the shipped decode. Grid: (ceil(s_q*G / 64), h_k, num_sm_parts).
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
    allow_dependent_launch();
#endif
    a.work = load_part(metadata, blockIdx.z);
    if (a.work.end_req < a.work.begin_req) return;  // idle part

    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < KV_STAGES; ++s) {
            mbarrier_init(sm.full_bar(s), 1);
            mbarrier_init(sm.empty_bar(s), PV_THREADS);
            mbarrier_init(sm.p_ready_bar(s), WG_THREADS);
        }
        fence_barrier_init();
    }
    __syncthreads();

    const int wg = tid / WG_THREADS;
    if (wg == 0) {
        setmaxnreg_inc<SCORES_WG_REGS>();
        run_scores_wg(a, sm, tid);
    } else {
        setmaxnreg_dec<PV_WG_REGS>();
        run_pv_wg(a, sm, tid % WG_THREADS, wg - 1, tid == 2 * WG_THREADS);
    }
}
