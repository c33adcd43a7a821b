// GPU scheduler: splits the paged KV work of a batch evenly across SM "parts".
// One CTA, no host sync, capturable in a CUDA graph; the schedule depends only on
// cache_seqlens, so it is computed once per decode step and reused by every layer.
//
// Cost model: request i costs SPLIT_OVERHEAD_PAGES + pages_i "positions" laid end to end
// (overhead first, then one position per page); part p owns positions
// [p * payload, (p + 1) * payload) with payload = ceil(total / num_parts). Every page thus
// lands in exactly one part, a request is split where a part boundary cuts its pages, and each
// part finds its range by binary search: the whole schedule is parallel.
//
// No-split rule: a split costs more than the model's overhead says (the extra Q load, partial
// write and combine; ~6% of a part at 128 x 4096 on H200). When the costliest request is
// within `slack_16ths` sixteenths of the payload, the payload grows to it, so equal-length
// batches of slightly fewer requests than parts run one request per part, unsplit.
#include "ptx_helpers.cuh"
#include "mla_common.cuh"

constexpr int SCHEDULE_THREADS = 1024;
constexpr int SCHEDULE_WARPS = SCHEDULE_THREADS / 32;

DEVICE int pages_of_len(int len) { return len > 0 ? (len + PAGE_SIZE - 1) / PAGE_SIZE : 0; }

// Exclusive prefix sum of one value per thread across the CTA; returns the CTA total too.
DEVICE int block_exclusive_scan(int value, int* warp_sums, int& total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int inclusive = value;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (lane >= o) inclusive += up;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        int s = lane < SCHEDULE_WARPS ? warp_sums[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int up = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += up;
        }
        warp_sums[lane] = s;  // inclusive warp prefix
    }
    __syncthreads();
    total = warp_sums[SCHEDULE_WARPS - 1];
    const int result = inclusive - value + (warp > 0 ? warp_sums[warp - 1] : 0);
    __syncthreads();  // warp_sums is reused by the next call
    return result;
}

// Positions of request i: first and last (inclusive) owned position. A request without pages
// is anchored at its start so that exactly one part writes its empty output.
struct Span { int first, last; };

DEVICE Span span_of(const int* start, int i, int overhead) {
    const int pages = start[i + 1] - start[i] - overhead;
    if (pages == 0) return {start[i], start[i]};
    return {start[i] + overhead, start[i] + overhead + pages - 1};
}

// seqlens: int32 [batch]; metadata: int32 [num_parts, METADATA_FIELDS];
// num_splits: int32 [batch + 1], exclusive prefix of each request's split count.
// Dynamic smem: int32 [batch + 1], the start position of each request.
extern "C" __global__ void __launch_bounds__(SCHEDULE_THREADS)
mla_schedule(const int* __restrict__ seqlens, int batch, int num_parts, int overhead,
             int slack_16ths, int* __restrict__ metadata, int* __restrict__ num_splits) {
    extern __shared__ int start[];
    __shared__ int warp_sums[32];
    __shared__ int max_cost;
    // A decode launched programmatically behind this kernel may start its CTAs now; they wait
    // for this grid's results in grid_dependency_wait. A no-op for an ordinary launch.
    allow_dependent_launch();
    if (threadIdx.x == 0) max_cost = 0;
    __syncthreads();

    // 1. start[i] = sum of the costs of the requests before i.
    int carry = 0;
    for (int base = 0; base < batch; base += SCHEDULE_THREADS) {
        const int i = base + threadIdx.x;
        const int cost = i < batch ? pages_of_len(seqlens[i]) + overhead : 0;
        int chunk_total;
        const int before = block_exclusive_scan(cost, warp_sums, chunk_total);
        if (i < batch) start[i] = carry + before;
        carry += chunk_total;
        const int warp_max = __reduce_max_sync(0xffffffffu, cost);
        if (threadIdx.x % 32 == 0) atomicMax(&max_cost, warp_max);
    }
    if (threadIdx.x == 0) start[batch] = carry;
    __syncthreads();
    int payload = (carry + num_parts - 1) / num_parts;
    if (max_cost > payload && max_cost * 16 <= payload * (16 + slack_16ths)) payload = max_cost;

    // 2. Splits per request = parts its span touches; num_splits is their exclusive prefix.
    int split_carry = 0;
    for (int base = 0; base < batch; base += SCHEDULE_THREADS) {
        const int i = base + threadIdx.x;
        int splits = 0;
        if (i < batch) {
            const Span s = span_of(start, i, overhead);
            splits = s.last / payload - s.first / payload + 1;
        }
        int chunk_total;
        const int before = block_exclusive_scan(splits, warp_sums, chunk_total);
        if (i < batch) num_splits[i] = split_carry + before;
        split_carry += chunk_total;
    }
    if (threadIdx.x == 0) num_splits[batch] = split_carry;
    __syncthreads();

    // 3. Each part: the requests whose spans meet [lo, hi), by binary search over the spans
    //    (first and last positions both increase strictly with the request index).
    for (int part = threadIdx.x; part < num_parts; part += SCHEDULE_THREADS) {
        const int lo = part * payload, hi = lo + payload;
        int a = 0, b = batch;  // first request with last >= lo
        while (a < b) {
            const int m = (a + b) / 2;
            if (span_of(start, m, overhead).last >= lo) b = m; else a = m + 1;
        }
        const int begin_req = a;
        a = begin_req; b = batch;  // first request with first >= hi
        while (a < b) {
            const int m = (a + b) / 2;
            if (span_of(start, m, overhead).first >= hi) b = m; else a = m + 1;
        }
        const int end_req = a - 1;
        int* row = metadata + part * METADATA_FIELDS;
        row[MD_BEGIN_REQ] = begin_req;
        row[MD_END_REQ] = end_req;  // < begin_req: idle part
        if (begin_req <= end_req) {
            const Span first = span_of(start, begin_req, overhead);
            const Span last = span_of(start, end_req, overhead);
            const int last_pages = start[end_req + 1] - start[end_req] - overhead;
            row[MD_BEGIN_PAGE] = lo > first.first ? lo - first.first : 0;
            row[MD_END_PAGE] = last_pages == 0 ? 0 : (hi <= last.last ? hi : last.last + 1) - last.first;
            row[MD_BEGIN_SPLIT] = num_splits[begin_req] + part - first.first / payload;
        } else {
            row[MD_BEGIN_PAGE] = row[MD_END_PAGE] = row[MD_BEGIN_SPLIT] = 0;
        }
        row[5] = row[6] = row[7] = 0;
    }
}
