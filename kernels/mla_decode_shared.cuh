// What every version of the split-KV decode shares: the tile geometry, the walk over the
// scheduler's (request, page range) pieces, Q staging, V-tail zeroing, the P V product and
// the output / partial stores. Versions differ in their warpgroup roles and hand-offs.
#pragma once
#include "ptx_helpers.cuh"
#include "mla_common.cuh"

constexpr int CHUNK_COLS = 64;                          // one 128-byte swizzle span
constexpr int CHUNK_BYTES = PAGE_SIZE * CHUNK_COLS * 2; // 8 KB
constexpr int QK_CHUNKS = HEAD_DIM_QK / CHUNK_COLS;     // 9
constexpr int V_CHUNKS = HEAD_DIM_V / CHUNK_COLS;       // 8
constexpr int TILE_BYTES = QK_CHUNKS * CHUNK_BYTES;     // 72 KB: one page, or the Q block
constexpr int WG_THREADS = 128;
constexpr int CONSUMER_THREADS = 2 * WG_THREADS;        // the two math warpgroups
constexpr int DECODE_THREADS = 3 * WG_THREADS;          // and the producer warpgroup
constexpr int V_COLS_PER_WG = HEAD_DIM_V / 2;           // 256: each warpgroup owns half of O
// Registers per thread at launch: __launch_bounds__(DECODE_THREADS, 1) caps ptxas at the
// register file over the threads, in steps of 8 (168). setmaxnreg only moves registers within
// that pool: a split that asks for more makes setmaxnreg.inc wait forever.
constexpr int LAUNCH_REGS_PER_THREAD = (65536 / DECODE_THREADS) / 8 * 8;
constexpr int K_STEP = 16;                              // wgmma K per instruction

struct __align__(64) TensorMap { uint64_t opaque[16]; };


// Phase trace (an off-by-default diagnostic, -DTRACE_PHASES=1; benchmarks/phase_trace.py reads
// it): one thread per role stamps the global timer at fixed events into a module-global table,
// one row per CTA. Off, trace_phase compiles to nothing.
#ifndef TRACE_PHASES
#define TRACE_PHASES 0
#endif
constexpr int TRACE_MAX_CTAS = 1024;
constexpr int TRACE_EVENTS = 16;
constexpr int TRACE_PIECES = 3;          // pieces of a CTA that get their own events
enum TraceEvent {
    EV_ENTRY = 0,                        // thread 0 enters the kernel
    EV_DEPENDENCY_DONE = 1,              // thread 0 is past the grid dependency wait
    EV_PIECE0 = 2,                       // + 4 p + one of the PIECE_* offsets below (warpgroup 0)
    EV_MATH1_DONE = 14,                  // warpgroup 1 stored its last output
    EV_FIRST_KV_ISSUED = 15,             // the producer issued the first page's loads
};
enum PieceEvent { PIECE_Q_READY = 0, PIECE_FIRST_PAGE = 1, PIECE_PAGES_DONE = 2, PIECE_STORED = 3 };
#if TRACE_PHASES
__device__ unsigned long long g_phase_trace[TRACE_MAX_CTAS][TRACE_EVENTS];
#endif

DEVICE void trace_phase(int event) {
#if TRACE_PHASES
    const int cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (cta < TRACE_MAX_CTAS && event >= 0 && event < TRACE_EVENTS) g_phase_trace[cta][event] = global_timer_ns();
#endif
}

// Warpgroup 0's event `which` of its `piece`-th piece with pages (the first TRACE_PIECES only).
DEVICE void trace_piece(int piece, PieceEvent which) {
    if (piece < TRACE_PIECES) trace_phase(EV_PIECE0 + 4 * piece + which);
}

// Page anatomy: the first TRACE_PAGES pages of a CTA's first piece with pages, stamped by thread
// 0 of each math warpgroup with the SM's cycle counter (the global timer is too coarse for
// sub-microsecond phases; both warpgroups share the SM, so their cycles compare).
constexpr int TRACE_PAGES = 8;
enum PageEvent {
    PG_READY = 0,        // warpgroup 0: the page's full barrier passed
    PG_SCORES_DONE = 1,  // warpgroup 0: S = Q K^T waited for
    PG_P_STORED = 2,     // warpgroup 0: P and the row scales stored for warpgroup 1
    PG_PV0_DONE = 3,     // warpgroup 0: its half of P V waited for
    PG_P_RECEIVED = 4,   // warpgroup 1: P_READY passed
    PG_PV1_DONE = 5,     // warpgroup 1: its half of P V done
    PAGE_EVENTS = 6,
};
#if TRACE_PHASES
__device__ long long g_page_trace[TRACE_MAX_CTAS][TRACE_PAGES][PAGE_EVENTS];
#endif

// `page` counts from the piece's first page; `first_piece`: no earlier piece of this CTA had pages.
DEVICE void trace_page(bool first_piece, int page, PageEvent which) {
#if TRACE_PHASES
    const int cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (first_piece && page < TRACE_PAGES && cta < TRACE_MAX_CTAS) g_page_trace[cta][page][which] = clock64();
#endif
}

// One (request, page range) of a part's work.
struct Piece {
    int req, page_begin, page_end, split;
    bool is_split;  // the request has several splits: write partials for the combine
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

// Row r of the 64-row block -> (query token, head) of KV head kh; rows are s_idx * G + g.
struct RowMap {
    int rows, group;  // rows = s_q * G valid rows; group = G = h_q / h_k
    DEVICE int s_idx(int row) const { return row / group; }
    DEVICE int head(int row, int kh) const { return kh * group + row % group; }
};

// Where a Q block's rows come from: the 512 latent columns and the 64 RoPE columns, each laid
// out [b, s_q, h_q, *] with its own element strides. One [.., 576] tensor is the case rope =
// latent + 512 with the same strides; vLLM hands the two halves over as separate tensors, and
// reading them in place spares it a concatenation per layer.
struct QSource {
    const uint16_t* latent;
    long long latent_stride_b, latent_stride_s, latent_stride_h;
    const uint16_t* rope;
    long long rope_stride_b, rope_stride_s, rope_stride_h;
};

constexpr int Q_LATENT_VECS = HEAD_DIM_V / 8;                  // 64 16-byte vectors a row
constexpr int Q_ROPE_VECS = (HEAD_DIM_QK - HEAD_DIM_V) / 8;     // 8

// Vectors [FIRST_VEC, FIRST_VEC + VECS) of each Q block row from `src` (its column 0 is vector
// FIRST_VEC) into the swizzled block; rows past the end are zero.
template <int THREADS, int FIRST_VEC, int VECS>
DEVICE void copy_q_columns(uint8_t* q_smem, const uint16_t* src, long long stride_b, long long stride_s,
                           long long stride_h, int req, int kh, int row_base, const RowMap& rows, int tid) {
    for (int idx = tid; idx < BLOCK_M * VECS; idx += THREADS) {
        const int r = idx / VECS, v = FIRST_VEC + idx % VECS;
        const int grow = row_base + r;
        const bool valid = grow < rows.rows;
        const uint16_t* from = valid ? src + req * stride_b + rows.s_idx(grow) * stride_s +
                                           rows.head(grow, kh) * stride_h + (v - FIRST_VEC) * 8
                                     : src;
        const int chunk = v / 8, unit = v % 8;
        cp_async_16_or_zero(q_smem + chunk * CHUNK_BYTES + r * 128 + ((unit ^ (r & 7)) << 4), from, valid);
    }
}

// Q block -> smem, 128B-swizzled K-major chunks; rows past the end are zero. By cp.async, so that
// every load of the block is in flight at once: a load-then-store loop waits one memory round
// trip per 16-byte vector (18 per thread), which cost 1-25% per row on an H200 (NOTES.md, v9).
// The caller waits with cp_async_wait_all and fences to the async proxy before wgmma reads it.
// THREADS threads share the block (tid in [0, THREADS)).
template <int THREADS = CONSUMER_THREADS>
DEVICE void load_q_block(uint8_t* q_smem, const QSource& q, int req, int kh, int row_base,
                         const RowMap& rows, int tid) {
    copy_q_columns<THREADS, 0, Q_LATENT_VECS>(q_smem, q.latent, q.latent_stride_b, q.latent_stride_s,
                                              q.latent_stride_h, req, kh, row_base, rows, tid);
    copy_q_columns<THREADS, Q_LATENT_VECS, Q_ROPE_VECS>(q_smem, q.rope, q.rope_stride_b, q.rope_stride_s,
                                                        q.rope_stride_h, req, kh, row_base, rows, tid);
}

// One 64-token page of one KV head (576 columns, token rows token_stride elements apart) into
// a 128B-swizzled page tile, by 16-byte cp.async from a warpgroup's 128 threads; consecutive
// threads read consecutive 16-byte vectors of a token row (72 per token). The caller completes
// it on the stage's full barrier (the shipped producer waits for its copies, then arrives).
DEVICE void copy_page_cp_async(uint8_t* tile, const uint16_t* page_src, long long token_stride, int tid) {
    constexpr int VECS_PER_TOKEN = HEAD_DIM_QK / 8;
    static_assert(PAGE_SIZE * VECS_PER_TOKEN % WG_THREADS == 0, "whole vectors per thread");
    // Vector tid + 128 j is (token r, vector v) = (idx / 72, idx % 72), stepped incrementally
    // (128 = 72 + 56) to fit a 40-register producer.
    int r = tid / VECS_PER_TOKEN, v = tid % VECS_PER_TOKEN;
#pragma unroll 4
    for (int j = 0; j < PAGE_SIZE * VECS_PER_TOKEN / WG_THREADS; ++j) {
        cp_async_16(tile + (v / 8) * CHUNK_BYTES + r * 128 + (((v % 8) ^ (r & 7)) << 4),
                    page_src + r * token_stride + v * 8);
        v += WG_THREADS - VECS_PER_TOKEN;
        r += 1;
        if (v >= VECS_PER_TOKEN) { v -= VECS_PER_TOKEN; r += 1; }
    }
}

// Zeroes V rows [first_row, 64) of a page tile (chunks CHUNK_BYTES apart, rows 128 bytes):
// cache slots past the sequence end may hold NaN, and P = 0 times NaN would still be NaN. Whole
// 128-byte rows are zeroed, so the swizzle does not matter.
DEVICE void zero_v_tail(uint8_t* kv_tile, int first_row, int tid) {
    const int rows = PAGE_SIZE - first_row;
    for (int idx = tid; idx < V_CHUNKS * rows * 8; idx += WG_THREADS) {
        const int chunk = idx / (rows * 8), rem = idx % (rows * 8);
        const int r = first_row + rem / 8, unit = rem % 8;
        *reinterpret_cast<uint4*>(kv_tile + chunk * CHUNK_BYTES + r * 128 + unit * 16) = make_uint4(0, 0, 0, 0);
    }
}

// Accumulator fragment of wgmma m64nN (f32): register i of a thread holds
// row = warp*16 + lane/4 + 8*((i>>1)&1), col = 8*(i>>2) + 2*(lane%4) + (i&1).
DEVICE int frag_row(int i, int warp, int lane) { return warp * 16 + lane / 4 + 8 * ((i >> 1) & 1); }
DEVICE int frag_col(int i, int lane) { return 8 * (i >> 2) + 2 * (lane % 4) + (i & 1); }

DEVICE void rescale_rows(float (&o)[128], float alpha0, float alpha1) {
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] *= ((i >> 1) & 1) ? alpha1 : alpha0;
}

// Skips the 128 multiplies when neither of this thread's rows changed its max (a branch, not
// predication: a warp runs them only if one of its threads needs them).
DEVICE void rescale_rows_if_needed(float (&o)[128], float alpha0, float alpha1) {
    if (alpha0 != 1.f || alpha1 != 1.f) rescale_rows(o, alpha0, alpha1);
}

// 2^x for x <= ~16 by a degree-3 polynomial on the FMA pipe (relative error 7.5e-5, below
// bf16's and fp16's rounding), to share the softmax's exponentials between the FMA pipe and
// the MUFU unit, which issues one warp-wide ex2 per 8 cycles (FlashAttention-4 does the same).
// round(x) is taken by the 1.5 * 2^23 trick: it lands in the low mantissa bits of `shifted`,
// and shifting those into the exponent field scales the polynomial of the fraction.
DEVICE float exp2_on_fma_pipe(float x) {
    constexpr float ROUND_MAGIC = 12582912.f;  // 1.5 * 2^23
    constexpr float C0 = 0.99992812f, C1 = 0.69326097f, C2 = 0.24261053f, C3 = 0.05517131f;
    // The result's exponent field stays >= 0; below 2^-126 it is a denormal, which the kernels'
    // -ftz=true flushes to zero (a masked score, -inf, must give exactly 0 to a row's sum).
    x = fmaxf(x, -126.f);
    const float shifted = x + ROUND_MAGIC;
    const float frac = x - (shifted - ROUND_MAGIC);  // in [-0.5, 0.5]
    float p = fmaf(frac, C3, C2);
    p = fmaf(p, frac, C1);
    p = fmaf(p, frac, C0);
    return __int_as_float(__float_as_int(p) + (__float_as_int(shifted) << 23));
}

// A warp's 16 rows of P (p[2n + half]: rows 8 half + lane / 4, columns 8n + 2 (lane % 4) and
// +1, the scores' accumulator layout) into a 64 x 64 tile with 128-byte rows, 16-byte groups
// swizzled by the row (group n of row r at (n ^ (r & 7)) * 16, the A-operand layout of the P V
// wgmma): four stmatrix of four 8x8 matrices, (n, half) = (2j, 0), (2j, 1), (2j + 1, 0),
// (2j + 1, 1) in store j, each lane giving row lane % 8 of matrix lane / 8.
DEVICE void store_p_by_stmatrix(uint32_t tile_addr, const uint32_t (&p)[16], int warp, int lane) {
    const int m = lane / 8, r = warp * 16 + 8 * (m & 1) + lane % 8;
    const uint32_t row_addr = tile_addr + r * 128;
#pragma unroll
    for (int j = 0; j < 4; ++j)
        stmatrix_x4(row_addr + (((2 * j + (m >> 1)) ^ (lane % 8)) << 4), p[4 * j], p[4 * j + 1], p[4 * j + 2],
                    p[4 * j + 3]);
}

// O[:, col_base:col_base+256] += P V for one page, P from smem.
DEVICE void pv_gemm(float (&o)[128], uint32_t p_addr, uint32_t v_addr) {
    const SmemOperand<> p_tile(p_addr);
    const SmemOperand<CHUNK_BYTES> v_tile(v_addr);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < PAGE_SIZE / K_STEP; ++k)
        wgmma_m64n256k16_ss_bt(o, p_tile.at(k * K_STEP * 2), v_tile.at(k * K_STEP * 128));
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(o);
}

// Output stores by quad exchange: in the accumulator layout the 4 lanes of a quad own one row,
// lane t holding columns 8n + 2t and + 1 of each 8-column group n, so a direct store would write
// 8 (float32) or 4 (16-bit) bytes a lane. Exchanging within the quad first gives every lane 16
// contiguous bytes: half the stores for the partials, a quarter for the final output (run 18,
// H200: the b = 8 epilogue 3.1 -> 2.4 us, that row -3%, mixed -2%).

// One exchange with the neighbour lane (xor `bit`) over two groups: the lane whose `bit` is
// clear keeps `lo`'s values and gets its neighbour's `lo`, the other keeps `hi` and gets the
// neighbour's `hi`. Returned in column order: (clear lane: own lo, neighbour lo; set lane:
// neighbour hi, own hi).
// T: float (partials) or uint32_t (two packed 16-bit outputs).
template <typename T>
DEVICE void exchange_halves(T lo, T hi, int bit, bool set, T& first, T& second) {
    const T got = __shfl_xor_sync(0xffffffffu, set ? lo : hi, bit);
    first = set ? got : lo;
    second = set ? hi : got;
}

// Writes this warpgroup's 64 x 256 half of O for rows row0 and row0 + 8, normalised by the
// row sums; final output if the request is not split, else a float32 partial for the combine.
// Every lane of the warp must call it (the stores exchange values across lanes).
DEVICE void store_output(const float (&o)[128], const float (&row_sum)[2], const float (&row_lse)[2],
                         int col_base, int warp, int lane, const Piece& piece, int kh,
                         int row_base, const RowMap& rows, int s_q, int h_q, int h_k,
                         uint16_t* out, float* lse, float* o_part, float* lse_part, bool write_lse) {
    const int t = lane % 4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = warp * 16 + lane / 4 + 8 * half;
        const int grow = row_base + r;
        // A quad shares its row, so `valid` is uniform per quad: every lane takes part in the
        // exchanges and only the stores are skipped.
        const bool valid = grow < rows.rows;
        const float inv = row_sum[half] > 0.f ? 1.f / row_sum[half] : 0.f;
        const int s_idx = rows.s_idx(grow), head = rows.head(grow, kh);
        if (!piece.is_split) {
            uint16_t* dst = out + ((size_t)(piece.req * s_q + s_idx) * h_q + head) * HEAD_DIM_V + col_base;
            // Two exchanges over groups n..n+3: the neighbour lane's (xor 1) gives every lane 4
            // columns of group n + (t & 1) and of n + 2 + (t & 1); the next one's (xor 2) gives
            // lane t all 8 columns of group n + t. One lane base and constant offsets: per-n lane
            // offsets were hoisted out of the page loop and spilled.
            uint16_t* lane_dst = dst + 8 * t;
#pragma unroll
            for (int n = 0; n < V_COLS_PER_WG / 8; n += 4) {
                uint32_t w[4];
#pragma unroll
                for (int g = 0; g < 4; ++g)
                    w[g] = pack_half2(o[4 * (n + g) + 2 * half] * inv, o[4 * (n + g) + 2 * half + 1] * inv);
                uint32_t a0, a1, b0, b1;  // 4 columns of group n (+1), of group n + 2 (+1)
                exchange_halves(w[0], w[1], 1, t & 1, a0, a1);
                exchange_halves(w[2], w[3], 1, t & 1, b0, b1);
                uint32_t c0, c1, c2, c3;
                exchange_halves(a0, b0, 2, t & 2, c0, c2);
                exchange_halves(a1, b1, 2, t & 2, c1, c3);
                if (valid) *reinterpret_cast<uint4*>(lane_dst + 8 * n) = make_uint4(c0, c1, c2, c3);
            }
            if (valid && write_lse && t == 0)
                lse[((size_t)piece.req * h_q + head) * s_q + s_idx] = row_sum[half] > 0.f ? row_lse[half] : POS_INF;
        } else {
            const size_t prow = ((size_t)piece.split * h_k + kh) * rows.rows + grow;
            float* dst = o_part + prow * HEAD_DIM_V + col_base;
            // Over groups n and n + 1, even lanes take group n's columns 2t..2t+3 and odd lanes
            // group n + 1's columns 2(t-1)..2t+1: one exchange with the neighbour lane.
            float* lane_dst = dst + 2 * t + 6 * (t & 1);
#pragma unroll
            for (int n = 0; n < V_COLS_PER_WG / 8; n += 2) {
                float v0, v1, v2, v3;
                exchange_halves(o[4 * n + 2 * half] * inv, o[4 * (n + 1) + 2 * half] * inv, 1, t & 1, v0, v2);
                exchange_halves(o[4 * n + 2 * half + 1] * inv, o[4 * (n + 1) + 2 * half + 1] * inv, 1, t & 1, v1, v3);
                if (valid) *reinterpret_cast<float4*>(lane_dst + 8 * n) = make_float4(v0, v1, v2, v3);
            }
            if (valid && write_lse && t == 0)
                lse_part[prow] = row_sum[half] > 0.f ? row_lse[half] : NEG_INF;
        }
    }
}


// Everything a role needs to walk its part's pieces.
struct DecodeArgs {
    const TensorMap* kv_map;
    QSource q;
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
    int kh, row_base;
    RowMap rows;
    PartWork work;
};

// The kernel's arguments (the same in every version), gathered for the roles; this CTA's KV
// head and query block come from blockIdx.
DEVICE DecodeArgs gather_decode_args(const TensorMap* kv_map, const uint16_t* q, long long q_stride_b,
                                     long long q_stride_s, long long q_stride_h, const int* block_table,
                                     long long bt_stride, const int* seqlens, const int* num_splits,
                                     uint16_t* out, float* lse, float* o_part, float* lse_part, int s_q,
                                     int h_q, int h_k, int causal, float scale_log2, int kv_evict_first) {
    DecodeArgs a;
    a.kv_map = kv_map;
    // One [.., 576] q tensor; a version that takes the RoPE columns separately overwrites a.q.rope*.
    a.q = QSource{q, q_stride_b, q_stride_s, q_stride_h, q + HEAD_DIM_V, q_stride_b, q_stride_s, q_stride_h};
    a.block_table = block_table; a.bt_stride = bt_stride;
    a.seqlens = seqlens; a.num_splits = num_splits;
    a.out = out; a.lse = lse; a.o_part = o_part; a.lse_part = lse_part;
    a.s_q = s_q; a.h_q = h_q; a.h_k = h_k; a.causal = causal; a.kv_evict_first = kv_evict_first;
    a.scale_log2 = scale_log2;
    a.kh = blockIdx.y;
    a.row_base = blockIdx.x * BLOCK_M;
    a.rows = RowMap{s_q * (h_q / h_k), h_q / h_k};
    return a;
}
