// Combine: merges the float32 partial outputs of a split request, weighting each split by
// exp(lse_split - lse_total). One warp per (request, KV head, query row); requests with a
// single split were written directly by the decode kernel and are skipped.
#include "ptx_helpers.cuh"
#include "mla_common.cuh"

constexpr int COMBINE_WARPS = 4;
constexpr int COLS_PER_LANE_STEP = 4;  // one float4 per lane per 128 columns

// o_part: [splits, h_k, rows, 512] f32; lse_part: [splits, h_k, rows] f32 with rows = s_q*G.
// out: contiguous [b, s_q, h_q, 512]; lse: contiguous [b, h_q, s_q]. Grid (ceil(h_k*rows/4), b).
extern "C" __global__ void __launch_bounds__(COMBINE_WARPS * 32)
mla_combine(const float* __restrict__ o_part, const float* __restrict__ lse_part,
            const int* __restrict__ num_splits, uint16_t* __restrict__ out,
            float* __restrict__ lse, int s_q, int h_q, int h_k) {
    const int group = h_q / h_k, rows = s_q * group;
    const int flat = blockIdx.x * COMBINE_WARPS + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int req = blockIdx.y;
    if (flat >= h_k * rows) return;
    const int first = num_splits[req], count = num_splits[req + 1] - first;
    if (count <= 1) return;
    const int kh = flat / rows, row = flat % rows;
    const int s_idx = row / group, head = kh * group + row % group;
    const size_t split_stride = (size_t)h_k * rows;
    const size_t base = (size_t)first * split_stride + (size_t)kh * rows + row;

    float lse_max = NEG_INF;
    for (int i = lane; i < count; i += 32) lse_max = fmaxf(lse_max, lse_part[base + i * split_stride]);
    lse_max = warp_reduce_max(lse_max);

    uint16_t* dst = out + ((size_t)(req * s_q + s_idx) * h_q + head) * HEAD_DIM_V;
    float* lse_dst = lse + ((size_t)req * h_q + head) * s_q + s_idx;
    if (lse_max == NEG_INF) {  // every key masked or absent
        for (int c = lane * 2; c < HEAD_DIM_V; c += 64) *reinterpret_cast<uint32_t*>(dst + c) = 0u;
        if (lane == 0) *lse_dst = POS_INF;
        return;
    }
    float sum = 0.f;
    for (int i = lane; i < count; i += 32) sum += __expf(lse_part[base + i * split_stride] - lse_max);
    sum = warp_reduce_sum(sum);
    const float lse_total = lse_max + __logf(sum);

    float4 acc[HEAD_DIM_V / (32 * COLS_PER_LANE_STEP)];
#pragma unroll
    for (int j = 0; j < HEAD_DIM_V / 128; ++j) acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int i = 0; i < count; ++i) {
        const size_t prow = base + i * split_stride;
        const float w = __expf(lse_part[prow] - lse_total);
        const float4* src = reinterpret_cast<const float4*>(o_part + prow * HEAD_DIM_V);
#pragma unroll
        for (int j = 0; j < HEAD_DIM_V / 128; ++j) {
            const float4 v = src[j * 32 + lane];
            acc[j].x += w * v.x; acc[j].y += w * v.y; acc[j].z += w * v.z; acc[j].w += w * v.w;
        }
    }
#pragma unroll
    for (int j = 0; j < HEAD_DIM_V / 128; ++j) {
        uint2 packed = make_uint2(pack_half2(acc[j].x, acc[j].y), pack_half2(acc[j].z, acc[j].w));
        *reinterpret_cast<uint2*>(dst + (j * 32 + lane) * 4) = packed;
    }
    if (lane == 0) *lse_dst = lse_total;
}
