// Combine: merges the float32 partial outputs of a split request, weighting each split by
// exp(lse_split - lse_total). A CTA of 8 warps serves 8 / warps_per_row output rows of requests
// blockIdx.y, blockIdx.y + gridDim.y, ... (the host may give a CTA several requests: where few
// or none are split, fewer CTAs drain faster after the decode); the warps of a row share its
// splits and reduce through shared memory. Requests with one split were written directly by the
// decode kernel and are skipped.
// A warp requests its first SPLITS_IN_FLIGHT partial rows, their LSEs and LSE_CHUNK lane-strided
// LSEs for the max before reducing anything: one L2 round trip before the first FMA, not three
// (NOTES.md, c2: -0.5 to -0.7 us on the latency rows, H200).
#include "ptx_helpers.cuh"
#include "mla_common.cuh"

constexpr int COMBINE_WARPS = 8;
constexpr int COLS_PER_LANE = HEAD_DIM_V / 32;        // 16 columns = 4 float4 per lane
constexpr int VEC_PER_LANE = COLS_PER_LANE / 4;
#ifndef COMBINE_SPLITS_IN_FLIGHT  // an A/B knob (FLASHMLA_BACKEND_COMBINE_DEFINES)
#define COMBINE_SPLITS_IN_FLIGHT 4
#endif
constexpr int SPLITS_IN_FLIGHT = COMBINE_SPLITS_IN_FLIGHT;
// Knob (on), set together with the decode's DEPENDENTS_AFTER_FIRST_ISSUE: the split range
// (num_splits, the scheduler's) is read before the dependency wait, which that decode makes safe,
// so the wait is followed by one round trip (the LSEs and partials), not two.
#ifndef SPLITS_BEFORE_WAIT
#define SPLITS_BEFORE_WAIT 1
#endif
// Knob (on; run 33, H100: -0.5 us a call on the rows that split nothing): under programmatic
// launch only the CTAs that have a split request to merge wait for the decode, and CTA (0, 0),
// whose wait keeps this grid from completing before the decode has. The others exit once they
// have read their split ranges: they pass through SMs the decode leaves idle, or as its CTAs
// leave, instead of one wave of waiting CTAs dispatched after its last CTA. Needs the ranges read
// before the wait (SPLITS_BEFORE_WAIT); without it every CTA waits.
// 2 is a diagnostic, never a setting: CTA (0, 0) skips too (run 33: a plain launch after the
// call still saw the whole output, so the stream itself orders it after the decode).
#ifndef IDLE_CTAS_SKIP_WAIT
#define IDLE_CTAS_SKIP_WAIT 1
#endif
constexpr bool IDLE_SKIP_WAIT = IDLE_CTAS_SKIP_WAIT && SPLITS_BEFORE_WAIT;
constexpr int LSE_CHUNK = 4;  // LSEs per lane loaded at once: 128 splits per round trip
constexpr int MAX_REQUESTS_PER_CTA = 32;  // the host's bound (_constants.py)

// A group of SPLITS_IN_FLIGHT partial rows of one warp: rows i0, i0 + step, ... (zero rows and
// -inf LSEs past count), VEC_PER_LANE float4 columns per lane (a row is 128 float4 columns).
struct SplitGroup {
    float lse[SPLITS_IN_FLIGHT];
    float4 v[SPLITS_IN_FLIGHT][VEC_PER_LANE];
};

DEVICE void load_group(SplitGroup& g, const float* o_part, const float* lse_part, size_t base,
                       size_t split_stride, int i0, int step, int count, int lane) {
#pragma unroll
    for (int u = 0; u < SPLITS_IN_FLIGHT; ++u) {
        const int i = i0 + u * step;
        g.lse[u] = NEG_INF;
#pragma unroll
        for (int j = 0; j < VEC_PER_LANE; ++j) g.v[u][j] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (i < count) {
            const size_t prow = base + i * split_stride;
            g.lse[u] = lse_part[prow];
            const float4* src = reinterpret_cast<const float4*>(o_part + prow * HEAD_DIM_V);
#pragma unroll
            for (int j = 0; j < VEC_PER_LANE; ++j) g.v[u][j] = src[j * 32 + lane];
        }
    }
}

// LSE_CHUNK lane-strided split LSEs from split `first` on (-inf past count).
DEVICE void load_lse_chunk(float (&l)[LSE_CHUNK], const float* lse_part, size_t base,
                           size_t split_stride, int first, int count) {
#pragma unroll
    for (int u = 0; u < LSE_CHUNK; ++u) {
        const int i = first + 32 * u;
        l[u] = i < count ? lse_part[base + i * split_stride] : NEG_INF;
    }
}

// One CTA's rows of request req, whose splits are first .. first + count - 1 (count > 1). Every
// thread of the CTA calls it and returns from it (it may run again for the CTA's next request).
DEVICE void combine_rows(const float* __restrict__ o_part, const float* __restrict__ lse_part, int req,
                         int first, int count, uint16_t* __restrict__ out, float* __restrict__ lse, int s_q,
                         int h_q, int h_k, int warps_per_row, float4 (&partial)[COMBINE_WARPS][HEAD_DIM_V / 4]) {
    const int group = h_q / h_k, rows = s_q * group;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int sub = warp % warps_per_row;
    const int flat = blockIdx.x * (COMBINE_WARPS / warps_per_row) + warp / warps_per_row;
    const bool active = flat < h_k * rows;
    const int kh = flat / rows, row = flat % rows;
    const size_t split_stride = (size_t)h_k * rows;
    const size_t base = (size_t)first * split_stride + (size_t)kh * rows + row;
    const int step = warps_per_row;  // this warp's splits: sub, sub + step, ...

    float lse_max = NEG_INF, lse_total = NEG_INF;
    float4 acc[VEC_PER_LANE];
#pragma unroll
    for (int j = 0; j < VEC_PER_LANE; ++j) acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (active) {
        // Everything the first group needs is requested before anything is reduced.
        SplitGroup g;
        load_group(g, o_part, lse_part, base, split_stride, sub, step, count, lane);
        float l[LSE_CHUNK];
        load_lse_chunk(l, lse_part, base, split_stride, lane, count);
        float lane_max = NEG_INF;
#pragma unroll
        for (int u = 0; u < LSE_CHUNK; ++u) lane_max = fmaxf(lane_max, l[u]);
        for (int i = lane + 32 * LSE_CHUNK; i < count; i += 32 * LSE_CHUNK) {  // > 128 splits
            float more[LSE_CHUNK];
            load_lse_chunk(more, lse_part, base, split_stride, i, count);
#pragma unroll
            for (int u = 0; u < LSE_CHUNK; ++u) lane_max = fmaxf(lane_max, more[u]);
        }
        lse_max = warp_reduce_max(lane_max);
        if (lse_max != NEG_INF) {
            float sum = 0.f;
#pragma unroll
            for (int u = 0; u < LSE_CHUNK; ++u) sum += __expf(l[u] - lse_max);  // exp(-inf) = 0
            for (int i = lane + 32 * LSE_CHUNK; i < count; i += 32 * LSE_CHUNK) {  // L1 hits
                float more[LSE_CHUNK];
                load_lse_chunk(more, lse_part, base, split_stride, i, count);
#pragma unroll
                for (int u = 0; u < LSE_CHUNK; ++u) sum += __expf(more[u] - lse_max);
            }
            lse_total = lse_max + __logf(warp_reduce_sum(sum));
            for (int i0 = sub;;) {
#pragma unroll
                for (int u = 0; u < SPLITS_IN_FLIGHT; ++u) {
                    const float w = __expf(g.lse[u] - lse_total);
#pragma unroll
                    for (int j = 0; j < VEC_PER_LANE; ++j) {
                        acc[j].x += w * g.v[u][j].x; acc[j].y += w * g.v[u][j].y;
                        acc[j].z += w * g.v[u][j].z; acc[j].w += w * g.v[u][j].w;
                    }
                }
                i0 += step * SPLITS_IN_FLIGHT;
                if (i0 >= count) break;
                load_group(g, o_part, lse_part, base, split_stride, i0, step, count, lane);
            }
        }
    }
    if (warps_per_row > 1) {
#pragma unroll
        for (int j = 0; j < VEC_PER_LANE; ++j) partial[warp][j * 32 + lane] = acc[j];
        __syncthreads();
        if (sub == 0)
            for (int w = 1; w < warps_per_row; ++w)
#pragma unroll
                for (int j = 0; j < VEC_PER_LANE; ++j) {
                    const float4 v = partial[warp + w][j * 32 + lane];
                    acc[j].x += v.x; acc[j].y += v.y; acc[j].z += v.z; acc[j].w += v.w;
                }
        __syncthreads();  // partial is free for the CTA's next request
    }
    if (!active || sub != 0) return;
    const int s_idx = row / group, head = kh * group + row % group;
    uint16_t* dst = out + ((size_t)(req * s_q + s_idx) * h_q + head) * HEAD_DIM_V;
#pragma unroll
    for (int j = 0; j < VEC_PER_LANE; ++j)  // all-masked rows: acc stays 0
        *reinterpret_cast<uint2*>(dst + (j * 32 + lane) * 4) =
            make_uint2(pack_half2(acc[j].x, acc[j].y), pack_half2(acc[j].z, acc[j].w));
    if (lane == 0)  // every key masked or absent: lse = +inf
        lse[((size_t)(req) * h_q + head) * s_q + s_idx] = lse_max == NEG_INF ? POS_INF : lse_total;
}

// o_part: [splits, h_k, rows, 512] f32; lse_part: [splits, h_k, rows] f32 with rows = s_q*G.
// out: contiguous [b, s_q, h_q, 512]; lse: contiguous [b, h_q, s_q].
// Grid (ceil(h_k * rows / (8 / warps_per_row)), ceil(batch / requests_per_cta)) with
// requests_per_cta <= MAX_REQUESTS_PER_CTA; warps_per_row in {1, 2, 4, 8}.
extern "C" __global__ void __launch_bounds__(COMBINE_WARPS * 32)
mla_combine(const float* __restrict__ o_part, const float* __restrict__ lse_part,
            const int* __restrict__ num_splits, uint16_t* __restrict__ out,
            float* __restrict__ lse, int s_q, int h_q, int h_k, int warps_per_row, int batch) {
    __shared__ float4 partial[COMBINE_WARPS][HEAD_DIM_V / 4];
    __shared__ int2 split_range[MAX_REQUESTS_PER_CTA];  // (first split, count) of each request
    const int requests = (batch - 1 - (int)blockIdx.y) / (int)gridDim.y + 1;  // this CTA's
    const int t = threadIdx.x;
    // Returns whether this thread's request is split.
    const auto read_split_ranges = [&] {
        if (t >= requests) return false;
        const int req = blockIdx.y + t * gridDim.y;
        const int first = num_splits[req], count = num_splits[req + 1] - first;
        split_range[t] = make_int2(first, count);
        return count > 1;
    };
#ifdef MLA_PROGRAMMATIC_LAUNCH
    const bool has_split = SPLITS_BEFORE_WAIT && read_split_ranges();
    // Launched behind the decode with programmatic stream serialization: the partials come
    // from the decode, which may still be running. Every CTA waits, the idle ones too, so that
    // this grid never completes (and releases the stream's next kernel) before the decode has;
    // with IDLE_SKIP_WAIT (above) CTA (0, 0) alone holds it for the idle ones.
    if (IDLE_SKIP_WAIT && !__syncthreads_or(has_split) &&
        ((blockIdx.x | blockIdx.y) != 0 || IDLE_CTAS_SKIP_WAIT == 2))
        return;
    grid_dependency_wait();
    if (!SPLITS_BEFORE_WAIT) read_split_ranges();
#else
    read_split_ranges();  // a plain launch runs after the decode
#endif
    __syncthreads();
    for (int i = 0; i < requests; ++i) {
        const int2 range = split_range[i];
        if (range.y > 1)  // the same for the whole CTA
            combine_rows(o_part, lse_part, blockIdx.y + i * gridDim.y, range.x, range.y, out, lse, s_q, h_q,
                         h_k, warps_per_row, partial);
    }
}
