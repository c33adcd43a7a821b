// EXPERIMENT v5 (not shipped, not yet run on a GPU; NOTES.md "v5"): the query rows of one KV
// head on the wgmma N dimension, for at most 32 rows (h_q = 16 under TP 8, with s_q <= 2).
// Same interface and launch shape as kernels/mla_decode.cu, so the A/B harness can swap it in
// (FLASHMLA_BACKEND_DECODE_FILE); it traps on more than 32 rows, so bench only h_q = 16 rows.
//
// Why: with 16 query rows, v1's 64-row M tile spends 75% of its tensor work on padding, and
// at h_q = 16 a page's math (~1.5 us) is most of its HBM time (~2.3 us on an H200), so a
// stage is held long and fewer bytes are in flight. Here
//   S^T[64 tokens x N]  = K[64 x 576] Q^T                  (A = K tile, B = Q; both K-major)
//   O^T[512 x N]       += V^T[512 x 64] P^T[64 x N]        (A = V read MN-major from the K
//                                                           tile, B = P^T K-major)
// with N = 16 or 32: 4x (2x) less tensor work than v1, and no hand-off between math
// warpgroups: one warpgroup does scores, softmax and P V, so every smem hand-off is a
// bar.sync inside that warpgroup.
//
// Roles (384 threads, v1's launch shape): warpgroup 0 math (240 regs); warpgroup 1, one
// thread streams 64-token pages by TMA into a two-stage ring (40 regs); warpgroup 2 idles.
// The softmax runs down the columns of S^T: a column's 64 tokens are spread over 8 lanes
// (2 rows each) and 4 warps, so column maxima meet in smem once per page (double-buffered by
// page parity, so one bar.sync per page suffices), and column sums once per piece.
#include "ptx_helpers.cuh"
#include "mla_common.cuh"

constexpr int CHUNK_COLS = 64;                          // one 128-byte swizzle span
constexpr int CHUNK_BYTES = PAGE_SIZE * CHUNK_COLS * 2; // 8 KB
constexpr int QK_CHUNKS = HEAD_DIM_QK / CHUNK_COLS;     // 9
constexpr int V_CHUNKS = HEAD_DIM_V / CHUNK_COLS;       // 8: O^T is 8 tiles of 64 dims
constexpr int TILE_BYTES = QK_CHUNKS * CHUNK_BYTES;     // 72 KB: one page, or the Q block
constexpr int KV_STAGES = 2;
constexpr int WG_THREADS = 128;
constexpr int MATH_WARPS = WG_THREADS / 32;
constexpr int DECODE_THREADS = 3 * WG_THREADS;
constexpr int MAX_N = 32;                               // query rows per KV head
constexpr int K_STEP = 16;
constexpr int BAR_MATH = 1;                             // the math warpgroup's own barrier

// Shared memory map (byte offsets from a 1024-aligned base). Q keeps v1's 64-row chunk
// layout (only the first N rows are read); P^T holds N rows of 64 tokens.
constexpr int SMEM_Q = 0;
constexpr int SMEM_KV = TILE_BYTES;
constexpr int SMEM_P = SMEM_KV + KV_STAGES * TILE_BYTES;
constexpr int SMEM_COL_MAX = SMEM_P + MAX_N * 128;                  // [2][warps][MAX_N] f32
constexpr int SMEM_COL_SUM = SMEM_COL_MAX + 2 * MATH_WARPS * MAX_N * 4; // [warps][MAX_N] f32
constexpr int SMEM_BARRIERS = SMEM_COL_SUM + MATH_WARPS * MAX_N * 4;
constexpr int SMEM_USED = SMEM_BARRIERS + 2 * KV_STAGES * 8;
constexpr int SMEM_ALIGN = 1024;
constexpr int DECODE_SMEM_BYTES = SMEM_USED + SMEM_ALIGN;
static_assert(DECODE_SMEM_BYTES <= 231456, "exceeds the smem the API launches decode with");

struct __align__(64) TensorMap { uint64_t opaque[16]; };

struct Piece {
    int req, page_begin, page_end, split;
    bool is_split;
};

struct PartWork {
    int begin_req, begin_page, end_req, end_page, begin_split;
};

DEVICE PartWork load_part(const int* metadata, int part) {
    const int* row = metadata + part * METADATA_FIELDS;
    return {row[MD_BEGIN_REQ], row[MD_BEGIN_PAGE], row[MD_END_REQ], row[MD_END_PAGE],
            row[MD_BEGIN_SPLIT]};
}

DEVICE int pages_of(int seqlen) { return (seqlen + PAGE_SIZE - 1) / PAGE_SIZE; }

DEVICE Piece piece_of(const PartWork& w, int req, const int* seqlens, const int* num_splits) {
    Piece p;
    p.req = req;
    p.page_begin = req == w.begin_req ? w.begin_page : 0;
    p.page_end = req == w.end_req ? w.end_page : pages_of(seqlens[req]);
    p.split = req == w.begin_req ? w.begin_split : num_splits[req];
    p.is_split = num_splits[req + 1] - num_splits[req] > 1;
    return p;
}

struct RowMap {
    int rows, group;
    DEVICE int s_idx(int row) const { return row / group; }
    DEVICE int head(int row, int kh) const { return kh * group + row % group; }
};

struct DecodeArgs {
    const TensorMap* kv_map;
    const uint16_t* q;
    long long q_stride_b, q_stride_s, q_stride_h;
    const int* block_table;
    long long bt_stride;
    const int* seqlens;
    const int* num_splits;
    uint16_t* out;
    float* lse;
    float* o_part;
    float* lse_part;
    int s_q, h_q, h_k, causal, kv_evict_first;
    float scale_log2;
    int kh;
    RowMap rows;
    PartWork work;
};

struct SharedTiles {
    uint8_t* base;
    DEVICE uint8_t* q() const { return base + SMEM_Q; }
    DEVICE uint8_t* kv(int stage) const { return base + SMEM_KV + stage * TILE_BYTES; }
    DEVICE uint8_t* p() const { return base + SMEM_P; }
    DEVICE float* col_max(int parity) const {
        return reinterpret_cast<float*>(base + SMEM_COL_MAX) + parity * MATH_WARPS * MAX_N;
    }
    DEVICE float* col_sum() const { return reinterpret_cast<float*>(base + SMEM_COL_SUM); }
    DEVICE uint64_t* full_bar() const { return reinterpret_cast<uint64_t*>(base + SMEM_BARRIERS); }
    DEVICE uint64_t* empty_bar() const { return full_bar() + KV_STAGES; }
};

DEVICE void setmaxnreg_inc_240() { asm volatile("setmaxnreg.inc.sync.aligned.u32 240;"); }
DEVICE void setmaxnreg_dec_40() { asm volatile("setmaxnreg.dec.sync.aligned.u32 40;"); }

// Accumulator fragment of wgmma m64nN (f32): register i of a thread holds
// row = warp*16 + lane/4 + 8*((i>>1)&1), col = 8*(i>>2) + 2*(lane%4) + (i&1).
// Here rows are tokens (S^T) or value dims (O^T), columns are query rows.
DEVICE int frag_row(int i, int warp, int lane) { return warp * 16 + lane / 4 + 8 * ((i >> 1) & 1); }
DEVICE int frag_col(int i, int lane) { return 8 * (i >> 2) + 2 * (lane % 4) + (i & 1); }
// A thread's columns are numbered 0..N/4-1: column slot of register i, and column of a slot.
DEVICE int col_slot(int i) { return 2 * (i >> 2) + (i & 1); }
DEVICE int slot_col(int slot, int lane) { return 8 * (slot >> 1) + 2 * (lane % 4) + (slot & 1); }

template <int N, int TRANS_A>
DEVICE void wgmma_m64nN(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    if constexpr (N == 16) wgmma_m64n16k16_ss<TRANS_A>(d, desc_a, desc_b, accumulate);
    else wgmma_m64n32k16_ss<TRANS_A>(d, desc_a, desc_b, accumulate);
}

// The first N query rows -> smem, v1's 128B-swizzled K-major chunks; rows past the end are zero.
template <int N>
DEVICE void load_q_rows(uint8_t* q_smem, const DecodeArgs& a, int req, int tid) {
    constexpr int VECS_PER_ROW = HEAD_DIM_QK / 8;  // 16-byte vectors
    for (int idx = tid; idx < N * VECS_PER_ROW; idx += WG_THREADS) {
        const int r = idx / VECS_PER_ROW, v = idx % VECS_PER_ROW;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < a.rows.rows) {
            const uint16_t* src = a.q + req * a.q_stride_b + a.rows.s_idx(r) * a.q_stride_s +
                                  a.rows.head(r, a.kh) * a.q_stride_h + v * 8;
            val = *reinterpret_cast<const uint4*>(src);
        }
        const int chunk = v / 8, unit = v % 8;
        *reinterpret_cast<uint4*>(q_smem + chunk * CHUNK_BYTES + r * 128 + ((unit ^ (r & 7)) << 4)) = val;
    }
}

// Zeroes V rows [first_row, 64) of a page tile: slots past the sequence end may hold NaN.
DEVICE void zero_v_tail(uint8_t* kv_tile, int first_row, int tid) {
    const int rows = PAGE_SIZE - first_row;
    for (int idx = tid; idx < V_CHUNKS * rows * 8; idx += WG_THREADS) {
        const int chunk = idx / (rows * 8), rem = idx % (rows * 8);
        const int r = first_row + rem / 8, unit = rem % 8;
        *reinterpret_cast<uint4*>(kv_tile + chunk * CHUNK_BYTES + r * 128 + unit * 16) =
            make_uint4(0, 0, 0, 0);
    }
}

// Producer: streams every page of every piece through the KV ring (v1's).
DEVICE void run_producer(const DecodeArgs& a, const SharedTiles& sm) {
    const uint64_t policy = a.kv_evict_first ? l2_policy_evict_first() : l2_policy_evict_last();
    int it = 0;
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        const int* pages = a.block_table + (size_t)req * a.bt_stride;
        for (int page = piece.page_begin; page < piece.page_end; ++page, ++it) {
            const int stage = it % KV_STAGES;
            mbarrier_wait(&sm.empty_bar()[stage], ((it / KV_STAGES) & 1) ^ 1);
            mbarrier_arrive_expect_tx(&sm.full_bar()[stage], TILE_BYTES);
            const int page_id = pages[page];
#pragma unroll
            for (int c = 0; c < QK_CHUNKS; ++c)
                tma_load_4d(sm.kv(stage) + c * CHUNK_BYTES, a.kv_map, &sm.full_bar()[stage],
                            c * CHUNK_COLS, a.kh, 0, page_id, policy);
        }
    }
}

// Writes O^T normalised by the column sums: the final output if the request is not split,
// else a float32 partial for the combine (v1's layouts).
template <int N>
DEVICE void store_output(const float (&o)[V_CHUNKS][N / 2], const float (&col_sum)[N / 4],
                         const float (&col_lse)[N / 4], int warp, int lane, const Piece& piece,
                         const DecodeArgs& a) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
        const int c = frag_col(i, lane);
        if (c >= a.rows.rows) continue;
        const float sum = col_sum[col_slot(i)];
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const int s_idx = a.rows.s_idx(c), head = a.rows.head(c, a.kh);
        if (!piece.is_split) {
            uint16_t* dst = a.out + ((size_t)(piece.req * a.s_q + s_idx) * a.h_q + head) * HEAD_DIM_V;
#pragma unroll
            for (int t = 0; t < V_CHUNKS; ++t) dst[t * CHUNK_COLS + frag_row(i, warp, lane)] = to_half_bits(o[t][i] * inv);
        } else {
            const size_t prow = ((size_t)piece.split * a.h_k + a.kh) * a.rows.rows + c;
            float* dst = a.o_part + prow * HEAD_DIM_V;
#pragma unroll
            for (int t = 0; t < V_CHUNKS; ++t) dst[t * CHUNK_COLS + frag_row(i, warp, lane)] = o[t][i] * inv;
        }
    }
    if (warp == 0 && lane < 4) {  // lanes 0-3 of warp 0 hold every column once
#pragma unroll
        for (int slot = 0; slot < N / 4; ++slot) {
            const int c = slot_col(slot, lane);
            if (c >= a.rows.rows) continue;
            const float sum = col_sum[slot];
            const int s_idx = a.rows.s_idx(c), head = a.rows.head(c, a.kh);
            if (!piece.is_split)
                a.lse[((size_t)piece.req * a.h_q + head) * a.s_q + s_idx] = sum > 0.f ? col_lse[slot] : POS_INF;
            else
                a.lse_part[((size_t)piece.split * a.h_k + a.kh) * a.rows.rows + c] = sum > 0.f ? col_lse[slot] : NEG_INF;
        }
    }
}

// Reduces per-thread column values over the 8 lanes that share a column, then over the 4
// warps through smem (one bar.sync); every thread gets the totals of its columns.
template <int N, bool MAX>
DEVICE void reduce_columns(float (&v)[N / 4], float* scratch, int warp, int lane) {
#pragma unroll
    for (int slot = 0; slot < N / 4; ++slot)
#pragma unroll
        for (int offset = 4; offset < 32; offset <<= 1) {
            const float other = __shfl_xor_sync(0xffffffffu, v[slot], offset);
            v[slot] = MAX ? fmaxf(v[slot], other) : v[slot] + other;
        }
    if (lane < 4) {
#pragma unroll
        for (int slot = 0; slot < N / 4; ++slot) scratch[warp * MAX_N + slot_col(slot, lane)] = v[slot];
    }
    named_barrier_sync(BAR_MATH, WG_THREADS);
#pragma unroll
    for (int slot = 0; slot < N / 4; ++slot) {
        const int c = slot_col(slot, lane);
        float total = scratch[c];
#pragma unroll
        for (int w = 1; w < MATH_WARPS; ++w)
            total = MAX ? fmaxf(total, scratch[w * MAX_N + c]) : total + scratch[w * MAX_N + c];
        v[slot] = total;
    }
}

// The math warpgroup: for each piece, S^T, column softmax, P^T to smem, O^T += V^T P^T.
template <int N>
DEVICE void run_math_wg(const DecodeArgs& a, const SharedTiles& sm, int tid) {
    constexpr int S_REGS = N / 2, SLOTS = N / 4;
    const int warp = tid / 32, lane = tid % 32;
    const uint32_t q_addr = smem_addr(sm.q()), p_addr = smem_addr(sm.p());
    int it = 0;
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        const bool has_pages = piece.page_end > piece.page_begin;
        const int seqlen = a.seqlens[req];
        if (has_pages) {
            // Q's previous readers (S wgmma) retired before the last bar.sync of the previous piece.
            load_q_rows<N>(sm.q(), a, req, tid);
            fence_proxy_async_smem();
            named_barrier_sync(BAR_MATH, WG_THREADS);
        }

        // Key limit of each of this thread's columns (bottom-right causal alignment).
        int limit[SLOTS];
#pragma unroll
        for (int slot = 0; slot < SLOTS; ++slot) {
            const int c = slot_col(slot, lane);
            limit[slot] = (a.causal && c < a.rows.rows) ? seqlen - (a.s_q - 1 - a.rows.s_idx(c)) : seqlen;
        }
        const int min_limit = a.causal ? seqlen - (a.s_q - 1) : seqlen;
        float col_max[SLOTS], col_sum[SLOTS];
#pragma unroll
        for (int slot = 0; slot < SLOTS; ++slot) col_max[slot] = NEG_INF, col_sum[slot] = 0.f;
        float o[V_CHUNKS][S_REGS];
#pragma unroll
        for (int t = 0; t < V_CHUNKS; ++t)
#pragma unroll
            for (int i = 0; i < S_REGS; ++i) o[t][i] = 0.f;

        for (int page = piece.page_begin; page < piece.page_end; ++page, ++it) {
            const int stage = it % KV_STAGES;
            uint8_t* kv_tile = sm.kv(stage);
            const uint32_t kv_addr = smem_addr(kv_tile);
            mbarrier_wait(&sm.full_bar()[stage], (it / KV_STAGES) & 1);

            float s[S_REGS];
#pragma unroll
            for (int i = 0; i < S_REGS; ++i) s[i] = 0.f;
            wgmma_fence();
#pragma unroll
            for (int c = 0; c < QK_CHUNKS; ++c)
#pragma unroll
                for (int k = 0; k < CHUNK_COLS / K_STEP; ++k)
                    wgmma_m64nN<N, 0>(s, desc_k_major(kv_addr + c * CHUNK_BYTES + k * K_STEP * 2),
                                      desc_k_major(q_addr + c * CHUNK_BYTES + k * K_STEP * 2),
                                      (c | k) != 0);
            wgmma_commit();
            wgmma_wait<0>();
            fence_accumulators(s);

            const int tok0 = page * PAGE_SIZE;
            if (tok0 + PAGE_SIZE > min_limit) {
#pragma unroll
                for (int i = 0; i < S_REGS; ++i)
                    if (tok0 + frag_row(i, warp, lane) >= limit[col_slot(i)]) s[i] = NEG_INF;
            }
            if (tok0 + PAGE_SIZE > seqlen) zero_v_tail(kv_tile, seqlen - tok0, tid);  // fenced below

            // Online softmax down each column, in the log2 domain; sums stay per thread.
            float page_max[SLOTS];
#pragma unroll
            for (int slot = 0; slot < SLOTS; ++slot) page_max[slot] = NEG_INF;
#pragma unroll
            for (int i = 0; i < S_REGS; ++i) page_max[col_slot(i)] = fmaxf(page_max[col_slot(i)], s[i]);
            reduce_columns<N, true>(page_max, sm.col_max(it & 1), warp, lane);
            float alpha[SLOTS], m_use[SLOTS];
#pragma unroll
            for (int slot = 0; slot < SLOTS; ++slot) {
                const float m_new = fmaxf(col_max[slot], page_max[slot] * a.scale_log2);
                m_use[slot] = m_new == NEG_INF ? 0.f : m_new;
                alpha[slot] = exp2f(col_max[slot] - m_use[slot]);
                col_max[slot] = m_new;
                col_sum[slot] *= alpha[slot];
            }
#pragma unroll
            for (int i = 0; i < S_REGS; ++i) {
                s[i] = exp2f(s[i] * a.scale_log2 - m_use[col_slot(i)]);
                col_sum[col_slot(i)] += s[i];
            }
#pragma unroll
            for (int t = 0; t < V_CHUNKS; ++t)
#pragma unroll
                for (int i = 0; i < S_REGS; ++i) o[t][i] *= alpha[col_slot(i)];

            // P^T -> smem as N rows of 64 tokens (K-major B, 128B swizzle). The previous
            // page's P V wgmma retired before this page's scores were issued.
#pragma unroll
            for (int i = 0; i < S_REGS; ++i) {
                const int r = frag_row(i, warp, lane), c = frag_col(i, lane);
                *reinterpret_cast<uint16_t*>(sm.p() + c * 128 + (((r >> 3) ^ (c & 7)) << 4) + (r & 7) * 2) =
                    to_half_bits(s[i]);
            }
            fence_proxy_async_smem();
            named_barrier_sync(BAR_MATH, WG_THREADS);

            wgmma_fence();
#pragma unroll
            for (int t = 0; t < V_CHUNKS; ++t)
#pragma unroll
                for (int k = 0; k < PAGE_SIZE / K_STEP; ++k)
                    wgmma_m64nN<N, 1>(o[t], desc_mn_major(kv_addr + t * CHUNK_BYTES + k * K_STEP * 128, CHUNK_BYTES),
                                      desc_k_major(p_addr + k * K_STEP * 2), 1);
            wgmma_commit();
            wgmma_wait<0>();
#pragma unroll
            for (int t = 0; t < V_CHUNKS; ++t) fence_accumulators(o[t]);
            mbarrier_arrive(&sm.empty_bar()[stage]);
        }

        float col_lse[SLOTS];
#pragma unroll
        for (int slot = 0; slot < SLOTS; ++slot) col_lse[slot] = 0.f;
        if (has_pages) {
            reduce_columns<N, false>(col_sum, sm.col_sum(), warp, lane);
#pragma unroll
            for (int slot = 0; slot < SLOTS; ++slot) col_lse[slot] = (col_max[slot] + log2f(col_sum[slot])) * LN2;
        }
        store_output<N>(o, col_sum, col_lse, warp, lane, piece, a);
    }
}

// Interface of kernels/mla_decode.cu. Grid: (1, h_k, num_sm_parts); needs s_q * h_q / h_k <= 32.
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

    DecodeArgs a;
    a.kv_map = &kv_map;
    a.q = q; a.q_stride_b = q_stride_b; a.q_stride_s = q_stride_s; a.q_stride_h = q_stride_h;
    a.block_table = block_table; a.bt_stride = bt_stride;
    a.seqlens = seqlens; a.num_splits = num_splits;
    a.out = out; a.lse = lse; a.o_part = o_part; a.lse_part = lse_part;
    a.s_q = s_q; a.h_q = h_q; a.h_k = h_k; a.causal = causal; a.kv_evict_first = kv_evict_first;
    a.scale_log2 = scale_log2;
    a.kh = blockIdx.y;
    a.rows = RowMap{s_q * (h_q / h_k), h_q / h_k};
    if (a.rows.rows > MAX_N || blockIdx.x != 0) __trap();  // an experiment: fail loudly
#ifdef MLA_PROGRAMMATIC_LAUNCH
    allow_dependent_launch();  // the combine may take idle SMs and wait there for this grid
#endif
    a.work = load_part(metadata, blockIdx.z);
    if (a.work.end_req < a.work.begin_req) return;  // idle part

    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < KV_STAGES; ++s) {
            mbarrier_init(&sm.full_bar()[s], 1);
            mbarrier_init(&sm.empty_bar()[s], WG_THREADS);
        }
        fence_barrier_init();
    }
    __syncthreads();

    if (tid < WG_THREADS) {
        setmaxnreg_inc_240();
        if (a.rows.rows <= 16) run_math_wg<16>(a, sm, tid);
        else run_math_wg<32>(a, sm, tid);
    } else {
        setmaxnreg_dec_40();
        if (tid == WG_THREADS) run_producer(a, sm);
    }
}
