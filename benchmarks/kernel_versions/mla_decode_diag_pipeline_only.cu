// DIAGNOSTIC (not a decode; outputs are zeros; NOTES.md "Memory-pipeline ceiling"): v1's
// producer, KV ring, scheduler pieces and output stores with the math taken out, to measure
// what the memory pipeline alone sustains. KV_STAGES comes from -DDIAG_STAGES (default 2, as
// v1; 3 fits because this version keeps no Q or P tile in shared memory). Timed with
// benchmarks/ab_session.sh, e.g. mla_decode_diag_pipeline_only+DIAG_STAGES=3.
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
#include "ptx_helpers.cuh"
#include "mla_common.cuh"

constexpr int CHUNK_COLS = 64;                          // one 128-byte swizzle span
constexpr int CHUNK_BYTES = PAGE_SIZE * CHUNK_COLS * 2; // 8 KB
constexpr int QK_CHUNKS = HEAD_DIM_QK / CHUNK_COLS;     // 9
constexpr int V_CHUNKS = HEAD_DIM_V / CHUNK_COLS;       // 8
constexpr int TILE_BYTES = QK_CHUNKS * CHUNK_BYTES;     // 72 KB: one page, or the Q block
#ifndef DIAG_STAGES
#define DIAG_STAGES 2
#endif
constexpr int KV_STAGES = DIAG_STAGES;
constexpr int WG_THREADS = 128;
constexpr int CONSUMER_THREADS = 2 * WG_THREADS;
constexpr int DECODE_THREADS = 3 * WG_THREADS;
constexpr int SOFTMAX_WG_REGS = 240;
constexpr int PV_WG_REGS = 224;
constexpr int PRODUCER_WG_REGS = 40;
static_assert(WG_THREADS * (SOFTMAX_WG_REGS + PV_WG_REGS + PRODUCER_WG_REGS) <= 65536,
              "register split exceeds the register file");
constexpr int V_COLS_PER_WG = HEAD_DIM_V / 2;           // 256: each warpgroup owns half of O
constexpr int K_STEP = 16;                              // wgmma K per instruction


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

struct __align__(64) TensorMap { uint64_t opaque[16]; };


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

// Q block -> smem, 128B-swizzled K-major chunks; rows past the end are zero.
DEVICE void load_q_block(uint8_t* q_smem, const uint16_t* q, long long q_stride_b,
                         long long q_stride_s, long long q_stride_h, int req, int kh,
                         int row_base, const RowMap& rows, int tid) {
    constexpr int VECS_PER_ROW = HEAD_DIM_QK / 8;  // 16-byte vectors
    for (int idx = tid; idx < BLOCK_M * VECS_PER_ROW; idx += CONSUMER_THREADS) {
        const int r = idx / VECS_PER_ROW, v = idx % VECS_PER_ROW;
        const int grow = row_base + r;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (grow < rows.rows) {
            const uint16_t* src = q + req * q_stride_b + rows.s_idx(grow) * q_stride_s +
                                  rows.head(grow, kh) * q_stride_h + v * 8;
            val = *reinterpret_cast<const uint4*>(src);
        }
        const int chunk = v / 8, unit = v % 8;
        *reinterpret_cast<uint4*>(q_smem + chunk * CHUNK_BYTES + r * 128 + ((unit ^ (r & 7)) << 4)) = val;
    }
}

// Zeroes V rows [first_row, 64) of a page tile: cache slots past the sequence end may hold
// NaN, and P = 0 times NaN would still be NaN.
DEVICE void zero_v_tail(uint8_t* kv_tile, int first_row, int tid) {
    const int rows = PAGE_SIZE - first_row;
    for (int idx = tid; idx < V_CHUNKS * rows * 8; idx += WG_THREADS) {
        const int chunk = idx / (rows * 8), rem = idx % (rows * 8);
        const int r = first_row + rem / 8, unit = rem % 8;
        *reinterpret_cast<uint4*>(kv_tile + chunk * CHUNK_BYTES + r * 128 + unit * 16) =
            make_uint4(0, 0, 0, 0);
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

// O[:, col_base:col_base+256] += P V for one page.
DEVICE void pv_gemm(float (&o)[128], uint32_t p_addr, uint32_t v_addr) {
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < PAGE_SIZE / K_STEP; ++k)
        wgmma_m64n256k16_ss_bt(o, desc_k_major(p_addr + k * K_STEP * 2),
                               desc_mn_major(v_addr + k * K_STEP * 128, CHUNK_BYTES));
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(o);
}

// Writes this warpgroup's 64 x 256 half of O for rows row0 and row0 + 8, normalised by the
// row sums; final output if the request is not split, else a float32 partial for the combine.
DEVICE void store_output(const float (&o)[128], const float (&row_sum)[2], const float (&row_lse)[2],
                         int col_base, int warp, int lane, const Piece& piece, int kh,
                         int row_base, const RowMap& rows, int s_q, int h_q, int h_k,
                         uint16_t* out, float* lse, float* o_part, float* lse_part, bool write_lse) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = warp * 16 + lane / 4 + 8 * half;
        const int grow = row_base + r;
        if (grow >= rows.rows) continue;
        const float inv = row_sum[half] > 0.f ? 1.f / row_sum[half] : 0.f;
        const int s_idx = rows.s_idx(grow), head = rows.head(grow, kh);
        if (!piece.is_split) {
            uint16_t* dst = out + ((size_t)(piece.req * s_q + s_idx) * h_q + head) * HEAD_DIM_V + col_base;
#pragma unroll
            for (int n = 0; n < V_COLS_PER_WG / 8; ++n) {
                const int c = 8 * n + 2 * (lane % 4);
                *reinterpret_cast<uint32_t*>(dst + c) =
                    pack_half2(o[4 * n + 2 * half] * inv, o[4 * n + 2 * half + 1] * inv);
            }
            if (write_lse && lane % 4 == 0)
                lse[((size_t)piece.req * h_q + head) * s_q + s_idx] = row_sum[half] > 0.f ? row_lse[half] : POS_INF;
        } else {
            const size_t prow = ((size_t)piece.split * h_k + kh) * rows.rows + grow;
            float* dst = o_part + prow * HEAD_DIM_V + col_base;
#pragma unroll
            for (int n = 0; n < V_COLS_PER_WG / 8; ++n) {
                const int c = 8 * n + 2 * (lane % 4);
                *reinterpret_cast<float2*>(dst + c) =
                    make_float2(o[4 * n + 2 * half] * inv, o[4 * n + 2 * half + 1] * inv);
            }
            if (write_lse && lane % 4 == 0)
                lse_part[prow] = row_sum[half] > 0.f ? row_lse[half] : NEG_INF;
        }
    }
}


// Everything a role needs to walk its part's pieces.
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
    int kh, row_base;
    RowMap rows;
    PartWork work;
};

struct SharedTiles {
    uint8_t* base;
    DEVICE uint8_t* kv(int stage) const { return base + SMEM_KV + stage * TILE_BYTES; }
    DEVICE uint64_t* full_bar() const { return reinterpret_cast<uint64_t*>(base + SMEM_BARRIERS); }
    DEVICE uint64_t* empty_bar() const { return full_bar() + KV_STAGES; }
};

DEVICE void setmaxnreg_inc_240() { asm volatile("setmaxnreg.inc.sync.aligned.u32 240;"); }
DEVICE void setmaxnreg_inc_224() { asm volatile("setmaxnreg.inc.sync.aligned.u32 224;"); }
DEVICE void setmaxnreg_dec_40() { asm volatile("setmaxnreg.dec.sync.aligned.u32 40;"); }

// Producer: streams every page of every piece through the KV ring.
DEVICE void run_producer(const DecodeArgs& a, const SharedTiles& sm) {
    // One query block streams each page once; several blocks re-read it from L2.
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
    a.row_base = blockIdx.x * BLOCK_M;
    a.rows = RowMap{s_q * (h_q / h_k), h_q / h_k};
#ifdef MLA_PROGRAMMATIC_LAUNCH
    allow_dependent_launch();  // the combine may take idle SMs and wait there for this grid
#endif
    a.work = load_part(metadata, blockIdx.z);
    if (a.work.end_req < a.work.begin_req) return;  // idle part

    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < KV_STAGES; ++s) {
            mbarrier_init(&sm.full_bar()[s], 1);
            mbarrier_init(&sm.empty_bar()[s], CONSUMER_THREADS);
        }
        fence_barrier_init();
    }
    __syncthreads();

    const int wg = tid / WG_THREADS;
    if (wg == 2) {
        setmaxnreg_dec_40();
        if (tid == 2 * WG_THREADS) run_producer(a, sm);
    } else {
        run_drain_wg(a, sm, tid, wg == 0 ? 0 : V_COLS_PER_WG, wg == 0);
    }
}
