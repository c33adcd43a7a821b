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
// Partial columns a lane requests per unit, and units a warp requests before reducing (A/B knobs:
// at 8 x 2, ptxas spills 16 bytes, stored in a warpgroup's prologue and reloaded after its pages).
#ifndef MERGE_SPLITS_IN_FLIGHT
#define MERGE_SPLITS_IN_FLIGHT 8
#endif
#ifndef MERGE_UNITS_IN_FLIGHT
#define MERGE_UNITS_IN_FLIGHT 2
#endif
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

// Where one split request's partials are: partial row of split s = row0 + s * split_stride.
struct MergeView {
    const float* o_part;
    const float* lse_part;
    size_t split_stride;
    int splits;
    DEVICE size_t row0(const DecodeArgs& a, int first_split, int grow) const {
        return ((size_t)first_split * a.h_k + a.kh) * a.rows.rows + grow;
    }
};

// One unit as requested: every split's LSE (lane-strided) and this warp's first partial columns
// (splits sub, sub + W, ...), all in flight before anything is reduced.
struct UnitLoad {
    float l[MERGE_LSE_CHUNK];
    float4 v[MERGE_SPLITS_IN_FLIGHT];
};

DEVICE void request_unit(UnitLoad& x, const MergeView& m, size_t row0, int col, int sub, int warps_per_unit,
                         int lane) {
    const float4* src = reinterpret_cast<const float4*>(m.o_part + row0 * HEAD_DIM_V + col) + lane;
#pragma unroll
    for (int k = 0; k < MERGE_SPLITS_IN_FLIGHT; ++k) {
        const int s = sub + k * warps_per_unit;
        x.v[k] = s < m.splits ? __ldcg(src + s * m.split_stride * (HEAD_DIM_V / 4)) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int c = 0; c < MERGE_LSE_CHUNK; ++c) {
        const int s = lane + 32 * c;
        x.l[c] = s < m.splits ? __ldcg(m.lse_part + row0 + s * m.split_stride) : NEG_INF;
    }
}

// This warp's weighted sum of its splits of the unit; lse_max and lse_total of the unit's row.
DEVICE float4 reduce_unit(UnitLoad& x, const MergeView& m, size_t row0, int col, int sub, int warps_per_unit,
                          int lane, float& lse_max, float& lse_total) {
    float lane_max = NEG_INF;
#pragma unroll
    for (int c = 0; c < MERGE_LSE_CHUNK; ++c) lane_max = fmaxf(lane_max, x.l[c]);
    for (int s = lane + 32 * MERGE_LSE_CHUNK; s < m.splits; s += 32)  // more splits than lanes keep
        lane_max = fmaxf(lane_max, __ldcg(m.lse_part + row0 + s * m.split_stride));
    lse_max = warp_reduce_max(lane_max);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    lse_total = NEG_INF;
    if (lse_max == NEG_INF) return acc;  // every key masked or absent (uniform across the warp)
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < MERGE_LSE_CHUNK; ++c) sum += __expf(x.l[c] - lse_max);  // exp(-inf) = 0
    for (int s = lane + 32 * MERGE_LSE_CHUNK; s < m.splits; s += 32)
        sum += __expf(__ldcg(m.lse_part + row0 + s * m.split_stride) - lse_max);
    lse_total = lse_max + __logf(warp_reduce_sum(sum));
#pragma unroll
    for (int c = 0; c < MERGE_LSE_CHUNK; ++c) x.l[c] = __expf(x.l[c] - lse_total);  // now weights
    const float4* src = reinterpret_cast<const float4*>(m.o_part + row0 * HEAD_DIM_V + col) + lane;
    for (int k0 = 0;; k0 += MERGE_SPLITS_IN_FLIGHT) {
#pragma unroll
        for (int k = 0; k < MERGE_SPLITS_IN_FLIGHT; ++k) {
            const int s = sub + (k0 + k) * warps_per_unit;  // uniform across the warp
            if (s >= m.splits) break;
            float w = __shfl_sync(0xffffffffu, select_chunk(x.l, s / 32), s % 32);
            if (s >= 32 * MERGE_LSE_CHUNK) w = __expf(__ldcg(m.lse_part + row0 + s * m.split_stride) - lse_total);
            acc.x += w * x.v[k].x; acc.y += w * x.v[k].y; acc.z += w * x.v[k].z; acc.w += w * x.v[k].w;
        }
        const int next = sub + (k0 + MERGE_SPLITS_IN_FLIGHT) * warps_per_unit;
        if (next >= m.splits) return acc;
#pragma unroll
        for (int k = 0; k < MERGE_SPLITS_IN_FLIGHT; ++k) {  // rare: more splits than one request covers
            const int s = next + k * warps_per_unit;
            x.v[k] = s < m.splits ? __ldcg(src + s * m.split_stride * (HEAD_DIM_V / 4)) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
}

// Merges this CTA's even share (`share` of `splits`) of request req's output units (row x 128
// columns) for its KV head and query block: out = sum_s exp(lse_s - lse) o_s. With fewer units
// than warps, warps_per_unit warps split a unit's splits and add up through `scratch` (smem,
// MERGE_WARPS x 32 float4); each warp requests two units before reducing either.
DEVICE void merge_split_share(const DecodeArgs& a, int req, int first_split, int splits, int share, int tid,
                              int bar, float4* scratch) {
    const int valid_rows = min(BLOCK_M, a.rows.rows - a.row_base);
    const int units = valid_rows * MERGE_UNITS_PER_ROW;
    const int u0 = share * units / splits, count = (share + 1) * units / splits - u0;
    if (count == 0) return;  // uniform across the CTA
    const int warps_per_unit = count >= MERGE_WARPS ? 1 : count >= MERGE_WARPS / 2 ? 2 : count >= 2 ? 4 : 8;
    const int groups = MERGE_WARPS / warps_per_unit;
    const int warp = tid / 32, lane = tid % 32, group = warp / warps_per_unit, sub = warp % warps_per_unit;
    const int rounds = (count + groups - 1) / groups;  // the same for every warp: barriers stay matched
    const MergeView m{a.o_part, a.lse_part, (size_t)a.h_k * a.rows.rows, splits};
    for (int r0 = 0; r0 < rounds; r0 += MERGE_UNITS_IN_FLIGHT) {
        UnitLoad x[MERGE_UNITS_IN_FLIGHT];
#pragma unroll
        for (int j = 0; j < MERGE_UNITS_IN_FLIGHT; ++j) {
            const int i = group + (r0 + j) * groups;
            if (r0 + j < rounds && i < count) {
                const int u = u0 + i;
                request_unit(x[j], m, m.row0(a, first_split, a.row_base + u / MERGE_UNITS_PER_ROW),
                             (u % MERGE_UNITS_PER_ROW) * MERGE_COLS, sub, warps_per_unit, lane);
            }
        }
#pragma unroll
        for (int j = 0; j < MERGE_UNITS_IN_FLIGHT; ++j) {
            if (r0 + j >= rounds) break;  // uniform
            const int i = group + (r0 + j) * groups, u = u0 + i;
            const bool active = i < count;  // uniform across the warp
            const int grow = a.row_base + u / MERGE_UNITS_PER_ROW, col = (u % MERGE_UNITS_PER_ROW) * MERGE_COLS;
            float lse_max = NEG_INF, lse_total = NEG_INF;
            float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
            if (active)
                acc = reduce_unit(x[j], m, m.row0(a, first_split, grow), col, sub, warps_per_unit, lane, lse_max,
                                  lse_total);
            if (warps_per_unit > 1) {
                scratch[warp * 32 + lane] = acc;
                named_barrier_sync(bar, MERGE_THREADS);
                if (sub == 0)
                    for (int w = 1; w < warps_per_unit; ++w) {
                        const float4 o = scratch[(warp + w) * 32 + lane];
                        acc.x += o.x; acc.y += o.y; acc.z += o.z; acc.w += o.w;
                    }
                named_barrier_sync(bar, MERGE_THREADS);  // scratch is rewritten next round
            }
            if (!active || sub != 0) continue;
            const int s_idx = a.rows.s_idx(grow), head = a.rows.head(grow, a.kh);
            uint16_t* dst = a.out + ((size_t)(req * a.s_q + s_idx) * a.h_q + head) * HEAD_DIM_V + col + 4 * lane;
            *reinterpret_cast<uint2*>(dst) = make_uint2(pack_half2(acc.x, acc.y), pack_half2(acc.z, acc.w));
            if (col == 0 && lane == 0)  // every key masked or absent: lse = +inf, output 0
                a.lse[((size_t)req * a.h_q + head) * a.s_q + s_idx] = lse_max == NEG_INF ? POS_INF : lse_total;
        }
    }
}

// Both math warpgroups, after their last piece: merge this CTA's share of each split request it
// took part in. Only a part's first and last pieces can be split (a boundary cuts them).
// scratch: MERGE_WARPS x 32 float4 of shared memory that no longer holds anything live.
DEVICE void merge_own_splits(const DecodeArgs& a, int* counters, int bar, int tid, float4* scratch) {
    for (int end = 0; end < 2; ++end) {
        const int req = end == 0 ? a.work.begin_req : a.work.end_req;
        if (end == 1 && req == a.work.begin_req) break;
        const int first_split = a.num_splits[req], splits = a.num_splits[req + 1] - first_split;
        if (splits <= 1) continue;  // written directly by its piece
        // The part's first piece may continue a request; its last piece starts one.
        const int share = end == 0 ? a.work.begin_split - first_split : 0;
        if (tid == 0) wait_all_splits(split_counter(counters, req, a.kh, a.h_k), splits);
        named_barrier_sync(bar, MERGE_THREADS);
        merge_split_share(a, req, first_split, splits, share, tid, bar, scratch);
    }
}
