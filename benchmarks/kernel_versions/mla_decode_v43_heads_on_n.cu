// v43 — heads on the wgmma N dimension, for at most 32 query rows per KV head (h_q = 16 with
// s_q 1 or 2: the memory, 32k, MTP and b = 1 rows). NOTES.md "v43".
//
// The shipped decode computes S = Q K^T with the 64 query rows on M, so at h_q = 16 three
// quarters of every scores and P V wgmma work on padding, and the math holds each KV stage
// ~2.3 us a page (run 25: a math-free pipeline held that long per page loses 2.2% on the memory
// row, the decode 3.1%). Here the rows go on N (16 or 32): S^T = K Q^T (M = the page's 64
// tokens, A = the K tile, B = the Q block, both K-major as they are) and O^T += V^T P^T (M =
// 64 dims of V per tile, A = the V chunk MN-major, B = P^T from shared memory), a quarter (N =
// 16) or half (N = 32) of the tensor work, so the stage goes back to the producer sooner.
//
// Warpgroup roles (384 threads, as the API launches every decode version):
//   warpgroup 0 (math):     S^T, masking, the online softmax down the columns (a head's 64
//                           scores of a page lie in 8 lanes of each of the 4 warps: shuffles,
//                           then one named barrier for the cross-warp max), P^T into the page's
//                           RoPE chunk (stmatrix, transposed), O^T for all 512 dims (8 wgmma
//                           tiles), the stores
//   warpgroup 1:            idle (setmaxnreg gives its registers to warpgroup 0)
//   warpgroup 2 (producer): the shipped producers (mla_kv_producers.cuh)
// The softmax keeps a column's max until a page raises it by more than 8 (log2), so P stays
// below 2^8 and most pages skip the rescale of O. At a piece's end O^T goes out through shared
// memory (the Q block's space), transposed, in 16-byte stores.
#include "mla_decode_shared.cuh"
#include "mla_kv_producers.cuh"

constexpr int KV_STAGES = 2;
constexpr int MATH_THREADS = WG_THREADS;
// Launch contract (read by the API): q rows per KV head, s_q * h_q / h_k, at most this.
constexpr int MAX_QUERY_ROWS = 32;
constexpr bool TAKES_KV_POINTER = true;
constexpr bool SELECTS_KV_PRODUCER = true;
constexpr bool TAKES_Q_ROPE_POINTER = true;

constexpr float COLUMN_RESCALE_THRESHOLD = 8.f;  // log2: keep a column's max until a page raises it more
constexpr int ROPE_CHUNK = QK_CHUNKS - 1;        // a page's chunk that holds its P^T after its scores
constexpr int STAGE_PITCH = HEAD_DIM_V + 4;      // floats per staged output row: conflict-free writes
constexpr int REDUCE_SLOTS = 3;                  // two for page maxima (by page parity), one for sums
constexpr int BAR_MATH = 1;                      // named barrier of warpgroup 0 (0 is __syncthreads)
static_assert(MAX_QUERY_ROWS * STAGE_PITCH * 4 <= TILE_BYTES, "staged output must fit the Q block's space");

// Shared memory map (byte offsets from a 1024-aligned base).
constexpr int SMEM_Q = 0;  // the Q block; at a piece's end, its output staged for the stores
constexpr int SMEM_KV = TILE_BYTES;
constexpr int SMEM_REDUCE = SMEM_KV + KV_STAGES * TILE_BYTES;  // [slot][column][warp] floats
constexpr int SMEM_BARRIERS = SMEM_REDUCE + REDUCE_SLOTS * 4 * MAX_QUERY_ROWS * 4;
constexpr int SMEM_USED = SMEM_BARRIERS + 2 * KV_STAGES * 8;
constexpr int SMEM_ALIGN = 1024;
constexpr int DECODE_SMEM_BYTES = SMEM_USED + SMEM_ALIGN;
static_assert(DECODE_SMEM_BYTES <= 227 * 1024, "decode tile does not fit in shared memory");
#ifdef MLA_LAUNCH_SMEM_BYTES
static_assert(DECODE_SMEM_BYTES <= MLA_LAUNCH_SMEM_BYTES, "the launch reserves less shared memory than this map needs");
#endif

struct SharedTiles {
    uint8_t* base;
    DEVICE uint8_t* q() const { return base + SMEM_Q; }
    DEVICE float* staged_out() const { return reinterpret_cast<float*>(base + SMEM_Q); }
    DEVICE uint8_t* kv(int stage) const { return base + SMEM_KV + stage * TILE_BYTES; }
    DEVICE uint8_t* p(int stage) const { return kv(stage) + ROPE_CHUNK * CHUNK_BYTES; }
    DEVICE float* reduce(int slot) const {
        return reinterpret_cast<float*>(base + SMEM_REDUCE) + slot * 4 * MAX_QUERY_ROWS;
    }
    DEVICE uint64_t* full_bar() const { return reinterpret_cast<uint64_t*>(base + SMEM_BARRIERS); }
    DEVICE uint64_t* empty_bar() const { return full_bar() + KV_STAGES; }
};

DEVICE void setmaxnreg_inc_240() { asm volatile("setmaxnreg.inc.sync.aligned.u32 240;"); }
DEVICE void setmaxnreg_dec_40() { asm volatile("setmaxnreg.dec.sync.aligned.u32 40;"); }

DEVICE void init_ring_barriers(const SharedTiles& sm, int load_by_cp_async) {
    for (int s = 0; s < KV_STAGES; ++s) {
        mbarrier_init(&sm.full_bar()[s], load_by_cp_async ? WG_THREADS : 1);
        mbarrier_init(&sm.empty_bar()[s], MATH_THREADS);
    }
    fence_barrier_init();
}

// ---- the math warpgroup ----
// D[64 x N] (+)= A[64 x 16] B[16 x N] with the query rows on N: TRANS_A = 0 for S^T = K Q^T
// (A K-major), 1 for O^T += V^T P^T (A = V, MN-major).
template <int N, int TRANS_A>
DEVICE void wgmma_rows_on_n(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    if constexpr (N == 16) wgmma_m64n16k16_ss<TRANS_A>(d, desc_a, desc_b, accumulate);
    else wgmma_m64n32k16_ss<TRANS_A>(d, desc_a, desc_b, accumulate);
}

// Accumulator register i of an m64nN fragment: row (a token of the page, or a dim of V) and
// column (a query row); a thread's columns are 8 j + 2 (lane % 4) + {0, 1}, N / 4 of them, the
// same for S^T and O^T. column_slot(i) numbers them 0 .. N / 4 - 1.
DEVICE int column_slot(int i) { return 2 * (i >> 2) + (i & 1); }
DEVICE int slot_column(int c, int lane) { return 8 * (c >> 1) + 2 * (lane % 4) + (c & 1); }

// Max (MAX) or sum over the warpgroup of each of this thread's columns (lanes sharing lane % 4
// share them): shuffles within the warp, then the four warps' values through shared memory,
// laid out [column][warp] so that a thread reads a column's four in one 16-byte load.
template <int N, bool MAX>
DEVICE void reduce_columns(float (&v)[N / 4], float* slot, int warp, int lane) {
    const auto op = [](float x, float y) { return MAX ? fmaxf(x, y) : x + y; };
#pragma unroll
    for (int c = 0; c < N / 4; ++c) {
        v[c] = op(v[c], __shfl_xor_sync(0xffffffffu, v[c], 4));
        v[c] = op(v[c], __shfl_xor_sync(0xffffffffu, v[c], 8));
        v[c] = op(v[c], __shfl_xor_sync(0xffffffffu, v[c], 16));
        if (lane < 4) slot[slot_column(c, lane) * 4 + warp] = v[c];
    }
    named_barrier_sync(BAR_MATH, MATH_THREADS);
#pragma unroll
    for (int c = 0; c < N / 4; ++c) {
        const float4 w = *reinterpret_cast<const float4*>(slot + slot_column(c, lane) * 4);
        v[c] = op(op(w.x, w.y), op(w.z, w.w));
    }
}

// P^T (query row n, token t) of a page: rows of 64 tokens (128 bytes), 16-byte groups swizzled
// by the row. A warp's 16 tokens x N rows of P, in the scores' accumulator layout, go out by
// stmatrix with transpose: 8x8 matrix (h, j) holds tokens 16 warp + 8 h + 0..7 of rows 8 j + 0..7
// (registers p[4 j + 2 h], + 1); its transpose's row r is row 8 j + r's 8 tokens, 16 bytes. One
// stmatrix.x4 stores matrices (0, 2q), (1, 2q), (0, 2q + 1), (1, 2q + 1).
// Knob (on): P^T by stmatrix.trans; 0 stores each element by itself (16-bit st.shared), the
// fallback if the transposed stmatrix's layout (emulated on the host as PTX documents it) is off.
#ifndef P_BY_STMATRIX
#define P_BY_STMATRIX 1
#endif

template <int N>
DEVICE void store_p_transposed(uint8_t* tile, const float (&p)[N / 2], int warp, int lane) {
    if (!P_BY_STMATRIX) {
#pragma unroll
        for (int i = 0; i < N / 2; ++i) {
            const int n = frag_col(i, lane), t = frag_row(i, warp, lane);
            *reinterpret_cast<uint16_t*>(tile + n * 128 + (((t >> 3) ^ (n & 7)) << 4) + (t & 7) * 2) = to_half_bits(p[i]);
        }
        return;
    }
    const uint32_t tile_addr = smem_addr(tile);
    const int m = lane / 8, r = lane % 8, h = m & 1;
#pragma unroll
    for (int q = 0; q < N / 16; ++q) {
        const int n = 8 * (2 * q + (m >> 1)) + r;
        const uint32_t addr = tile_addr + n * 128 + (((2 * warp + h) ^ r) << 4);
        stmatrix_x4_trans(addr, pack_half2(p[8 * q], p[8 * q + 1]), pack_half2(p[8 * q + 2], p[8 * q + 3]),
                          pack_half2(p[8 * q + 4], p[8 * q + 5]), pack_half2(p[8 * q + 6], p[8 * q + 7]));
    }
}

// One piece's output, normalised by the column sums: staged transposed in shared memory (the
// Q block's space), then 16-byte stores of whole rows; the final output and LSE, or a split's
// float32 partial and LSE for the combine.
template <int N>
DEVICE void store_piece(const DecodeArgs& a, const SharedTiles& sm, const Piece& piece,
                        const float (&o)[8][N / 2], const float (&inv)[N / 4], const float (&lse_of)[N / 4],
                        int warp, int lane, int tid) {
    float* staged = sm.staged_out();
#pragma unroll
    for (int mt = 0; mt < 8; ++mt)
#pragma unroll
        for (int i = 0; i < N / 2; ++i)
            staged[frag_col(i, lane) * STAGE_PITCH + mt * 64 + frag_row(i, warp, lane)] = o[mt][i] * inv[column_slot(i)];
    if (warp == 0 && lane < 4) {
#pragma unroll
        for (int c = 0; c < N / 4; ++c) {
            const int n = slot_column(c, lane);
            if (n >= a.rows.rows) continue;
            const int s_idx = a.rows.s_idx(n), head = a.rows.head(n, a.kh);
            if (piece.is_split)
                a.lse_part[((size_t)piece.split * a.h_k + a.kh) * a.rows.rows + n] = lse_of[c];
            else
                a.lse[((size_t)piece.req * a.h_q + head) * a.s_q + s_idx] = lse_of[c];
        }
    }
    named_barrier_sync(BAR_MATH, MATH_THREADS);
    if (piece.is_split) {
        constexpr int VECS = HEAD_DIM_V / 4;  // float4 a row
        for (int idx = tid; idx < a.rows.rows * VECS; idx += MATH_THREADS) {
            const int n = idx / VECS, v = idx % VECS;
            const float* src = staged + n * STAGE_PITCH + 4 * v;
            float* dst = a.o_part + (((size_t)piece.split * a.h_k + a.kh) * a.rows.rows + n) * HEAD_DIM_V + 4 * v;
            *reinterpret_cast<float4*>(dst) = make_float4(src[0], src[1], src[2], src[3]);
        }
    } else {
        constexpr int VECS = HEAD_DIM_V / 8;  // 8 16-bit elements a store
        for (int idx = tid; idx < a.rows.rows * VECS; idx += MATH_THREADS) {
            const int n = idx / VECS, v = idx % VECS;
            const float* src = staged + n * STAGE_PITCH + 8 * v;
            const int s_idx = a.rows.s_idx(n), head = a.rows.head(n, a.kh);
            uint16_t* dst = a.out + ((size_t)(piece.req * a.s_q + s_idx) * a.h_q + head) * HEAD_DIM_V + 8 * v;
            *reinterpret_cast<uint4*>(dst) = make_uint4(pack_half2(src[0], src[1]), pack_half2(src[2], src[3]),
                                                        pack_half2(src[4], src[5]), pack_half2(src[6], src[7]));
        }
    }
    named_barrier_sync(BAR_MATH, MATH_THREADS);  // the staging is read before the next Q lands there
}

template <int N>
DEVICE void run_math_wg(const DecodeArgs& a, const SharedTiles& sm, int tid) {
    const int warp = tid / 32, lane = tid % 32;
    const SmemOperand<> q_block(smem_addr(sm.q()));
    int it = 0;
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        const int seqlen = a.seqlens[req];
        if (piece.page_end > piece.page_begin) {
            load_q_block<MATH_THREADS>(sm.q(), a.q, req, a.kh, 0, a.rows, tid);
            cp_async_wait_all();
            fence_proxy_async_smem();
            named_barrier_sync(BAR_MATH, MATH_THREADS);
        }
        // Key limit of each of this thread's columns (bottom-right causal; padding columns see none).
        int limit[N / 4];
#pragma unroll
        for (int c = 0; c < N / 4; ++c) {
            const int n = slot_column(c, lane);
            limit[c] = n >= a.rows.rows ? 0 : a.causal ? seqlen - (a.s_q - 1 - a.rows.s_idx(n)) : seqlen;
        }
        float col_max[N / 4], col_sum[N / 4], o[8][N / 2];
#pragma unroll
        for (int c = 0; c < N / 4; ++c) { col_max[c] = NEG_INF; col_sum[c] = 0.f; }
#pragma unroll
        for (int mt = 0; mt < 8; ++mt)
#pragma unroll
            for (int i = 0; i < N / 2; ++i) o[mt][i] = 0.f;

        for (int page = piece.page_begin; page < piece.page_end; ++page, ++it) {
            const int stage = it % KV_STAGES;
            uint8_t* kv_tile = sm.kv(stage);
            const SmemOperand<> k_tile(smem_addr(kv_tile));
            const SmemOperand<CHUNK_BYTES> v_tile(smem_addr(kv_tile));
            const SmemOperand<> p_tile(smem_addr(sm.p(stage)));
            mbarrier_wait(&sm.full_bar()[stage], (it / KV_STAGES) & 1);

            float s[N / 2];
            wgmma_fence();
#pragma unroll
            for (int c = 0; c < QK_CHUNKS; ++c)
#pragma unroll
                for (int k = 0; k < CHUNK_COLS / K_STEP; ++k)
                    wgmma_rows_on_n<N, 0>(s, k_tile.at(c * CHUNK_BYTES + k * K_STEP * 2),
                                          q_block.at(c * CHUNK_BYTES + k * K_STEP * 2), (c | k) != 0);
            wgmma_commit();
            wgmma_wait<0>();
            fence_accumulators(s);

            // Mask, then each column's page max over the warpgroup (tokens are rows here).
            const int tok0 = page * PAGE_SIZE;
            float page_max[N / 4];
#pragma unroll
            for (int c = 0; c < N / 4; ++c) page_max[c] = NEG_INF;
#pragma unroll
            for (int i = 0; i < N / 2; ++i) {
                if (tok0 + frag_row(i, warp, lane) >= limit[column_slot(i)]) s[i] = NEG_INF;
                page_max[column_slot(i)] = fmaxf(page_max[column_slot(i)], s[i]);
            }
            reduce_columns<N, true>(page_max, sm.reduce(it & 1), warp, lane);

            float alpha[N / 4], m_use[N / 4];
            bool rescale = false;
#pragma unroll
            for (int c = 0; c < N / 4; ++c) {
                const float top = page_max[c] * a.scale_log2;
                const bool raise = top > col_max[c] + COLUMN_RESCALE_THRESHOLD;
                const float m_new = raise ? top : col_max[c];
                m_use[c] = m_new == NEG_INF ? 0.f : m_new;
                alpha[c] = raise ? exp2f(col_max[c] - m_use[c]) : 1.f;
                rescale |= raise;
                col_max[c] = m_new;
                col_sum[c] *= alpha[c];
            }
            if (rescale) {
#pragma unroll
                for (int mt = 0; mt < 8; ++mt)
#pragma unroll
                    for (int i = 0; i < N / 2; ++i) o[mt][i] *= alpha[column_slot(i)];
            }
            // P^T into the page's RoPE chunk (its scores are done), and the V rows past the
            // sequence's end zeroed (P is 0 there, but the cache slots may hold NaN).
#pragma unroll
            for (int i = 0; i < N / 2; ++i) {
                s[i] = exp2f(s[i] * a.scale_log2 - m_use[column_slot(i)]);
                col_sum[column_slot(i)] += s[i];
            }
            store_p_transposed<N>(sm.p(stage), s, warp, lane);
            if (tok0 + PAGE_SIZE > seqlen) zero_v_tail(kv_tile, seqlen - tok0, tid);
            fence_proxy_async_smem();
            named_barrier_sync(BAR_MATH, MATH_THREADS);  // P^T and the zeroes, before the wgmma reads them

            wgmma_fence();
#pragma unroll
            for (int mt = 0; mt < 8; ++mt)
#pragma unroll
                for (int k = 0; k < PAGE_SIZE / K_STEP; ++k)
                    wgmma_rows_on_n<N, 1>(o[mt], v_tile.at(mt * CHUNK_BYTES + k * K_STEP * 128),
                                          p_tile.at(k * K_STEP * 2), 1);
            wgmma_commit();
            wgmma_wait<0>();
#pragma unroll
            for (int mt = 0; mt < 8; ++mt) fence_accumulators(o[mt]);
            mbarrier_arrive(&sm.empty_bar()[stage]);
        }

        reduce_columns<N, false>(col_sum, sm.reduce(2), warp, lane);
        float inv[N / 4], lse_of[N / 4];
#pragma unroll
        for (int c = 0; c < N / 4; ++c) {
            const bool any = col_sum[c] > 0.f;
            inv[c] = any ? 1.f / col_sum[c] : 0.f;
            lse_of[c] = any ? (col_max[c] + log2f(col_sum[c])) * LN2 : piece.is_split ? NEG_INF : POS_INF;
        }
        store_piece<N>(a, sm, piece, o, inv, lse_of, warp, lane, tid);
    }
}

// The shipped decode's parameters (mla_decode.cu). Grid: (1, h_k, num_sm_parts).
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
    const SharedTiles sm{smem_raw + (SMEM_ALIGN - smem_addr(smem_raw) % SMEM_ALIGN) % SMEM_ALIGN};
    DecodeArgs a = gather_decode_args(&kv_map, q, q_stride_b, q_stride_s, q_stride_h, block_table, bt_stride,
                                      seqlens, num_splits, out, lse, o_part, lse_part, s_q, h_q, h_k, causal,
                                      scale_log2, kv_evict_first);
    a.q.rope = q_rope;
    a.q.rope_stride_b = q_rope_stride_b; a.q.rope_stride_s = q_rope_stride_s; a.q.rope_stride_h = q_rope_stride_h;
    if (a.rows.rows > MAX_QUERY_ROWS) return;  // the API refuses such shapes for this version
#ifdef MLA_PROGRAMMATIC_LAUNCH
    if (!DEPENDENTS_AFTER_FIRST_ISSUE) allow_dependent_launch();
    grid_dependency_wait();
#endif
    a.work = load_part(metadata, blockIdx.z);
    if (a.work.end_req < a.work.begin_req) return;

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
        if (a.rows.rows <= 16) run_math_wg<16>(a, sm, tid);
        else run_math_wg<32>(a, sm, tid);
    } else {
        setmaxnreg_dec_40();  // idle
    }
}
