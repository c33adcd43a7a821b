// Combine: merges the float32 partial outputs of a split request, weighting each split by
// exp(lse_split - lse_total). A CTA of 8 warps serves 8 / warps_per_row output rows of one
// request; the warps of a row share its splits and reduce through shared memory, so a
// request split many ways (small batches) is merged by many warps at once. Requests with one
// split were written directly by the decode kernel and are skipped.
#include "ptx_helpers.cuh"
#include "mla_common.cuh"

constexpr int COMBINE_WARPS = 8;
constexpr int COLS_PER_LANE = HEAD_DIM_V / 32;        // 16 columns = 4 float4 per lane
constexpr int VEC_PER_LANE = COLS_PER_LANE / 4;
#ifndef COMBINE_SPLITS_IN_FLIGHT  // an A/B knob (FLASHMLA_BACKEND_COMBINE_DEFINES)
#define COMBINE_SPLITS_IN_FLIGHT 4
#endif
constexpr int SPLITS_IN_FLIGHT = COMBINE_SPLITS_IN_FLIGHT;

// o_part: [splits, h_k, rows, 512] f32; lse_part: [splits, h_k, rows] f32 with rows = s_q*G.
// out: contiguous [b, s_q, h_q, 512]; lse: contiguous [b, h_q, s_q].
// Grid (ceil(h_k * rows / (8 / warps_per_row)), b); warps_per_row in {1, 2, 4, 8}.
extern "C" __global__ void __launch_bounds__(COMBINE_WARPS * 32)
mla_combine(const float* __restrict__ o_part, const float* __restrict__ lse_part,
            const int* __restrict__ num_splits, uint16_t* __restrict__ out,
            float* __restrict__ lse, int s_q, int h_q, int h_k, int warps_per_row) {
    __shared__ float4 partial[COMBINE_WARPS][HEAD_DIM_V / 4];
    const int req = blockIdx.y;
    const int first = num_splits[req], count = num_splits[req + 1] - first;
    if (count <= 1) return;  // the same for the whole CTA
#ifdef MLA_PROGRAMMATIC_LAUNCH
    // Launched behind the decode with programmatic stream serialization: num_splits comes
    // from the scheduler, which finished before the decode began; the partials come from the
    // decode, which may still be running.
    grid_dependency_wait();
#endif

    const int group = h_q / h_k, rows = s_q * group;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int sub = warp % warps_per_row;
    const int flat = blockIdx.x * (COMBINE_WARPS / warps_per_row) + warp / warps_per_row;
    const bool active = flat < h_k * rows;
    const int kh = flat / rows, row = flat % rows;
    const size_t split_stride = (size_t)h_k * rows;
    const size_t base = (size_t)first * split_stride + (size_t)kh * rows + row;

    float lse_max = NEG_INF, lse_total = NEG_INF;
    float4 acc[VEC_PER_LANE];
#pragma unroll
    for (int j = 0; j < VEC_PER_LANE; ++j) acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (active) {
        for (int i = lane; i < count; i += 32) lse_max = fmaxf(lse_max, lse_part[base + i * split_stride]);
        lse_max = warp_reduce_max(lse_max);
        if (lse_max != NEG_INF) {
            float sum = 0.f;
            for (int i = lane; i < count; i += 32) sum += __expf(lse_part[base + i * split_stride] - lse_max);
            lse_total = lse_max + __logf(warp_reduce_sum(sum));
            // SPLITS_IN_FLIGHT partial rows per warp are loaded before any is summed: a small
            // batch split 64 ways is a few dependent L2 round trips, not one per split pair.
            for (int i0 = sub; i0 < count; i0 += warps_per_row * SPLITS_IN_FLIGHT) {
                float w[SPLITS_IN_FLIGHT];
                float4 v[SPLITS_IN_FLIGHT][VEC_PER_LANE];
#pragma unroll
                for (int u = 0; u < SPLITS_IN_FLIGHT; ++u) {
                    const int i = i0 + u * warps_per_row;
                    w[u] = 0.f;
#pragma unroll
                    for (int j = 0; j < VEC_PER_LANE; ++j) v[u][j] = make_float4(0.f, 0.f, 0.f, 0.f);
                    if (i < count) {
                        const size_t prow = base + i * split_stride;
                        w[u] = __expf(lse_part[prow] - lse_total);
                        const float4* src = reinterpret_cast<const float4*>(o_part + prow * HEAD_DIM_V);
#pragma unroll
                        for (int j = 0; j < VEC_PER_LANE; ++j) v[u][j] = src[j * 32 + lane];
                    }
                }
#pragma unroll
                for (int u = 0; u < SPLITS_IN_FLIGHT; ++u)
#pragma unroll
                    for (int j = 0; j < VEC_PER_LANE; ++j) {
                        acc[j].x += w[u] * v[u][j].x; acc[j].y += w[u] * v[u][j].y;
                        acc[j].z += w[u] * v[u][j].z; acc[j].w += w[u] * v[u][j].w;
                    }
            }
        }
    }
    if (warps_per_row > 1) {
#pragma unroll
        for (int j = 0; j < VEC_PER_LANE; ++j) partial[warp][j * 32 + lane] = acc[j];
        __syncthreads();
        if (sub != 0) return;
        for (int w = 1; w < warps_per_row; ++w)
#pragma unroll
            for (int j = 0; j < VEC_PER_LANE; ++j) {
                const float4 v = partial[warp + w][j * 32 + lane];
                acc[j].x += v.x; acc[j].y += v.y; acc[j].z += v.z; acc[j].w += v.w;
            }
    }
    if (!active) return;
    const int s_idx = row / group, head = kh * group + row % group;
    uint16_t* dst = out + ((size_t)(req * s_q + s_idx) * h_q + head) * HEAD_DIM_V;
#pragma unroll
    for (int j = 0; j < VEC_PER_LANE; ++j)  // all-masked rows: acc stays 0
        *reinterpret_cast<uint2*>(dst + (j * 32 + lane) * 4) =
            make_uint2(pack_half2(acc[j].x, acc[j].y), pack_half2(acc[j].z, acc[j].w));
    if (lane == 0)  // every key masked or absent: lse = +inf
        lse[((size_t)req * h_q + head) * s_q + s_idx] = lse_max == NEG_INF ? POS_INF : lse_total;
}
