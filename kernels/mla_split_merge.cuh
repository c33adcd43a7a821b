// Split merge inside the decode (FUSED_COMBINE): the CTAs that computed a split request's
// float32 partials merge them themselves, each taking an even share of the output, instead of a
// separate combine kernel whose launch and dependency wait sit on the latency rows' path.
//
// Per (request, KV head, query block) split_counters holds two ints. `arrived`: each math
// warpgroup of each split adds 1 (release) after its half of the partial is stored. `departed`:
// each split's CTA adds 1 once it has seen all arrivals; the last one zeroes both, so every call
// starts from zero (the next kernel on the stream starts after this grid has completed).
// A CTA merges only after all its pieces are done: every split's partial is then written by CTAs
// that wait for nothing, so the waits cannot deadlock while the grid fits on the GPU at once
// (parts x blocks <= SMs, one CTA per SM, which the launch guarantees).
#pragma once
#include "mla_decode_shared.cuh"

constexpr int ARRIVALS_PER_SPLIT = 2;                      // one per math warpgroup
constexpr int MERGE_THREADS = 2 * WG_THREADS;              // both math warpgroups
constexpr int MERGE_WARPS = MERGE_THREADS / 32;
constexpr int MERGE_COLS = 128;                            // a unit: 128 columns of a row, a float4 a lane
constexpr int MERGE_UNITS_PER_ROW = HEAD_DIM_V / MERGE_COLS;
constexpr int MERGE_SPLITS_IN_FLIGHT = 4;                  // partial rows a warp requests at once
constexpr int MERGE_LSE_CHUNK = 5;                         // LSEs a lane keeps: 160 splits >= any part count
constexpr unsigned long long MERGE_SPIN_LIMIT_NS = 2000000000ull;  // a lost arrival traps, never hangs

// The (arrived, departed) pair of request req's split counters for this CTA's KV head and block.
DEVICE int* split_counter(int* counters, int req, int kh, int h_k) {
    return counters + 2 * (((size_t)req * h_k + kh) * gridDim.x + blockIdx.x);
}

// A math warpgroup has stored its half of a split's partial: sync the warpgroup on `bar`, then
// release one arrival.
DEVICE void arrive_split_stored(int* counter, int bar, int wg_tid) {
    named_barrier_sync(bar, WG_THREADS);
    if (wg_tid == 0) red_add_release_gpu(counter, 1);
}

// Ends the launch with an error (an illegal address). __trap() would do the same, but ptxas then
// spills ~650 bytes in the page loops.
DEVICE void fail_launch() { *reinterpret_cast<volatile int*>(static_cast<size_t>(8)) = 0; }

// Thread 0 of the merge: waits until every split of the request has arrived, then departs.
DEVICE void wait_all_splits(int* counter, int splits) {
    const unsigned long long start = global_timer_ns();
    while (load_acquire_gpu(counter) < ARRIVALS_PER_SPLIT * splits)
        if (global_timer_ns() - start > MERGE_SPIN_LIMIT_NS) fail_launch();
    if (atomicAdd(counter + 1, 1) == splits - 1) {  // the last to depart: reset for the next call
        counter[0] = 0;
        counter[1] = 0;
    }
}

DEVICE float select_chunk(const float (&v)[MERGE_LSE_CHUNK], int c) {
    float r = v[0];
#pragma unroll
    for (int i = 1; i < MERGE_LSE_CHUNK; ++i) r = c == i ? v[i] : r;
    return r;
}

// Merges split `share` of `splits`'s even share of the output units (row x 128 columns) of
// request req, this CTA's KV head and query block: out = sum_s exp(lse_s - lse) * o_s.
DEVICE void merge_split_share(const DecodeArgs& a, int req, int first_split, int splits, int share, int tid) {
    const int valid_rows = min(BLOCK_M, a.rows.rows - a.row_base);
    const int units = valid_rows * MERGE_UNITS_PER_ROW;
    const int warp = tid / 32, lane = tid % 32;
    const size_t split_stride = (size_t)a.h_k * a.rows.rows;  // partial rows between splits
    for (int u = share * units / splits + warp; u < (share + 1) * units / splits; u += MERGE_WARPS) {
        const int grow = a.row_base + u / MERGE_UNITS_PER_ROW, col = (u % MERGE_UNITS_PER_ROW) * MERGE_COLS;
        const size_t row0 = ((size_t)first_split * a.h_k + a.kh) * a.rows.rows + grow;
        const float4* src = reinterpret_cast<const float4*>(a.o_part + row0 * HEAD_DIM_V + col) + lane;
        const size_t src_stride = split_stride * HEAD_DIM_V / 4;
        // The first partial rows and every kept LSE are requested before anything is reduced.
        float4 v[MERGE_SPLITS_IN_FLIGHT];
#pragma unroll
        for (int j = 0; j < MERGE_SPLITS_IN_FLIGHT; ++j)
            v[j] = j < splits ? __ldcg(src + j * src_stride) : make_float4(0.f, 0.f, 0.f, 0.f);
        float l[MERGE_LSE_CHUNK];
#pragma unroll
        for (int c = 0; c < MERGE_LSE_CHUNK; ++c) {
            const int s = lane + 32 * c;
            l[c] = s < splits ? __ldcg(a.lse_part + row0 + s * split_stride) : NEG_INF;
        }
        float lane_max = NEG_INF;
#pragma unroll
        for (int c = 0; c < MERGE_LSE_CHUNK; ++c) lane_max = fmaxf(lane_max, l[c]);
        for (int s = lane + 32 * MERGE_LSE_CHUNK; s < splits; s += 32)
            lane_max = fmaxf(lane_max, __ldcg(a.lse_part + row0 + s * split_stride));
        const float lse_max = warp_reduce_max(lane_max);
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        float lse_total = NEG_INF;
        if (lse_max != NEG_INF) {  // uniform across the warp
            float sum = 0.f;
#pragma unroll
            for (int c = 0; c < MERGE_LSE_CHUNK; ++c) sum += __expf(l[c] - lse_max);  // exp(-inf) = 0
            for (int s = lane + 32 * MERGE_LSE_CHUNK; s < splits; s += 32)
                sum += __expf(__ldcg(a.lse_part + row0 + s * split_stride) - lse_max);
            lse_total = lse_max + __logf(warp_reduce_sum(sum));
#pragma unroll
            for (int c = 0; c < MERGE_LSE_CHUNK; ++c) l[c] = __expf(l[c] - lse_total);  // now weights
            for (int s0 = 0;;) {
#pragma unroll
                for (int j = 0; j < MERGE_SPLITS_IN_FLIGHT; ++j) {
                    const int s = s0 + j, c = s / 32;
                    float w = __shfl_sync(0xffffffffu, select_chunk(l, c), s % 32);
                    if (c >= MERGE_LSE_CHUNK) w = s < splits ? __expf(__ldcg(a.lse_part + row0 + s * split_stride) - lse_total) : 0.f;
                    acc.x += w * v[j].x; acc.y += w * v[j].y; acc.z += w * v[j].z; acc.w += w * v[j].w;
                }
                s0 += MERGE_SPLITS_IN_FLIGHT;
                if (s0 >= splits) break;
#pragma unroll
                for (int j = 0; j < MERGE_SPLITS_IN_FLIGHT; ++j)
                    v[j] = s0 + j < splits ? __ldcg(src + (s0 + j) * src_stride) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
        const int s_idx = a.rows.s_idx(grow), head = a.rows.head(grow, a.kh);
        uint16_t* dst = a.out + ((size_t)(req * a.s_q + s_idx) * a.h_q + head) * HEAD_DIM_V + col + 4 * lane;
        *reinterpret_cast<uint2*>(dst) = make_uint2(pack_half2(acc.x, acc.y), pack_half2(acc.z, acc.w));
        if (col == 0 && lane == 0)  // every key masked or absent: lse = +inf, output 0
            a.lse[((size_t)req * a.h_q + head) * a.s_q + s_idx] = lse_max == NEG_INF ? POS_INF : lse_total;
    }
}

// Both math warpgroups, after their last piece: merge this CTA's share of each split request it
// took part in. Only a part's first and last pieces can be split (a boundary cuts them).
DEVICE void merge_own_splits(const DecodeArgs& a, int* counters, int bar, int tid) {
    for (int end = 0; end < 2; ++end) {
        const int req = end == 0 ? a.work.begin_req : a.work.end_req;
        if (end == 1 && req == a.work.begin_req) break;
        const int first_split = a.num_splits[req], splits = a.num_splits[req + 1] - first_split;
        if (splits <= 1) continue;  // written directly by its piece
        // The part's first piece may continue a request; its last piece starts one.
        const int share = end == 0 ? a.work.begin_split - first_split : 0;
        if (tid == 0) wait_all_splits(split_counter(counters, req, a.kh, a.h_k), splits);
        named_barrier_sync(bar, MERGE_THREADS);
        merge_split_share(a, req, first_split, splits, share, tid);
    }
}
