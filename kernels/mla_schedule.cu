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
// Small batches (at most 32 requests, the latency rows) take `mla_schedule_small`: one warp's
// registers hold every request, so each warp computes the prefix sums itself by shuffles and
// searches them by shuffles, with no shared memory and no CTA barrier on the critical path
// between the seqlens load and the metadata stores.
//
// No-split rule: a split costs more than the model's overhead says (the extra Q load, partial
// write and combine; ~6% of a part at 128 x 4096 on H200). When the costliest request is
// within `slack_16ths` sixteenths of the payload, the payload grows to it, so equal-length
// batches of slightly fewer requests than parts run one request per part, unsplit.
//
// Whole-request rule (the `whole_requests` argument, FLASHMLA_BACKEND_WHOLE_REQUESTS): the model
// charges a piece's overhead where its request starts, so an even share can still give one part
// the pieces of two short requests back to back (128 requests of 32-96 keys: 26.2 us against
// 17.5 for 64 keys each, H100 run 29). With no more requests than parts and the costliest
// request within one overhead of the even share, every request is padded to the costliest
// one's positions and the payload is that cost: part i runs request i alone.
#include "ptx_helpers.cuh"
#include "mla_common.cuh"

constexpr int SCHEDULE_THREADS = 1024;
constexpr int SCHEDULE_WARPS = SCHEDULE_THREADS / 32;
constexpr int SMALL_SCHEDULE_THREADS = 256;   // one part per thread up to 256 parts
constexpr int SMALL_SCHEDULE_MAX_BATCH = 32;  // one request per lane
constexpr unsigned FULL_WARP = 0xffffffffu;
constexpr int NO_REQUEST_KEY = 0x7fffffff;  // a span bound past every position

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

// Positions per part: the even share, grown to the costliest request under the no-split rule.
DEVICE int part_payload(int total, int max_cost, int num_parts, int slack_16ths) {
    const int payload = (total + num_parts - 1) / num_parts;
    return max_cost > payload && max_cost * 16 <= payload * (16 + slack_16ths) ? max_cost : payload;
}

// The whole-request rule's condition (schedule.uses_whole_requests in Python).
DEVICE bool whole_requests_fit(int batch, int num_parts, int total, int max_cost, int overhead) {
    const int even_payload = (total + num_parts - 1) / num_parts;
    return max_cost > 0 && max_cost <= even_payload + overhead && batch <= num_parts;
}

// Positions of request i: first and last (inclusive) owned position. A request without pages
// is anchored at its start so that exactly one part writes its empty output. `stride` > 0 (the
// whole-request rule) puts request i at i * stride instead of at its cost prefix.
struct Span { int first, last; };

DEVICE Span span_of(const int* start, int i, int overhead, int stride) {
    const int pages = start[i + 1] - start[i] - overhead;
    const int base = stride > 0 ? i * stride : start[i];
    if (pages == 0) return {base, base};
    return {base + overhead, base + overhead + pages - 1};
}

// One row of the metadata: part `part` owns positions [part * payload, (part + 1) * payload),
// which meet requests begin_req..end_req (end_req < begin_req: an idle part). `first`, `last`:
// the spans of those two requests; last_pages: the last one's page count; first_split: the
// first request's split slot (its num_splits prefix).
DEVICE void write_part_row(int* row, int part, int payload, int begin_req, int end_req, Span first, Span last,
                           int last_pages, int first_split) {
    const int lo = part * payload, hi = lo + payload;
    row[MD_BEGIN_REQ] = begin_req;
    row[MD_END_REQ] = end_req;
    if (begin_req <= end_req) {
        row[MD_BEGIN_PAGE] = lo > first.first ? lo - first.first : 0;
        row[MD_END_PAGE] = last_pages == 0 ? 0 : (hi <= last.last ? hi : last.last + 1) - last.first;
        row[MD_BEGIN_SPLIT] = first_split + part - first.first / payload;
    } else {
        row[MD_BEGIN_PAGE] = row[MD_END_PAGE] = row[MD_BEGIN_SPLIT] = 0;
    }
    row[5] = row[6] = row[7] = 0;
}

// seqlens: int32 [batch]; metadata: int32 [num_parts, METADATA_FIELDS];
// num_splits: int32 [batch + 1], exclusive prefix of each request's split count.
// Dynamic smem: int32 [batch + 1], the start position of each request.
extern "C" __global__ void __launch_bounds__(SCHEDULE_THREADS)
mla_schedule(const int* __restrict__ seqlens, int batch, int num_parts, int overhead,
             int slack_16ths, int whole_requests, int* __restrict__ metadata, int* __restrict__ num_splits) {
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
    const bool whole = whole_requests && whole_requests_fit(batch, num_parts, carry, max_cost, overhead);
    const int payload = whole ? max_cost : part_payload(carry, max_cost, num_parts, slack_16ths);
    const int stride = whole ? max_cost : 0;

    // 2. Splits per request = parts its span touches; num_splits is their exclusive prefix.
    int split_carry = 0;
    for (int base = 0; base < batch; base += SCHEDULE_THREADS) {
        const int i = base + threadIdx.x;
        int splits = 0;
        if (i < batch) {
            const Span s = span_of(start, i, overhead, stride);
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
            if (span_of(start, m, overhead, stride).last >= lo) b = m; else a = m + 1;
        }
        const int begin_req = a;
        a = begin_req; b = batch;  // first request with first >= hi
        while (a < b) {
            const int m = (a + b) / 2;
            if (span_of(start, m, overhead, stride).first >= hi) b = m; else a = m + 1;
        }
        const int end_req = a - 1;
        const Span first = begin_req < batch ? span_of(start, begin_req, overhead, stride) : Span{0, 0};
        const Span last = end_req >= 0 ? span_of(start, end_req, overhead, stride) : Span{0, 0};
        const int last_pages = end_req >= 0 ? start[end_req + 1] - start[end_req] - overhead : 0;
        const int first_split = begin_req < batch ? num_splits[begin_req] : 0;
        write_part_row(metadata + part * METADATA_FIELDS, part, payload, begin_req, end_req, first, last,
                       last_pages, first_split);
    }
}

// Inclusive prefix sum across a warp.
DEVICE int warp_inclusive_scan(int value) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int up = __shfl_up_sync(FULL_WARP, value, o);
        if (lane >= o) value += up;
    }
    return value;
}

// How many lanes hold a key below `bound`, for keys that increase with the lane (lanes past
// the batch hold NO_REQUEST_KEY). Every lane runs the same six shuffles, each with its own bound.
DEVICE int warp_count_below(int key, int bound) {
    int count = 0;
#pragma unroll
    for (int step = 32; step > 0; step >>= 1) {
        const int probe = count + step - 1;
        if (__shfl_sync(FULL_WARP, key, probe < 31 ? probe : 31) < bound && probe < 32) count += step;
    }
    return count;
}

// The same schedule as mla_schedule for batch <= SMALL_SCHEDULE_MAX_BATCH. Lane i of every warp
// holds request i; each warp computes the whole prefix itself (the seqlens line is one L2 read),
// then each thread writes one part's row. Warp 0 writes num_splits.
extern "C" __global__ void __launch_bounds__(SMALL_SCHEDULE_THREADS)
mla_schedule_small(const int* __restrict__ seqlens, int batch, int num_parts, int overhead,
                   int slack_16ths, int whole_requests, int* __restrict__ metadata,
                   int* __restrict__ num_splits) {
    allow_dependent_launch();
    const int lane = threadIdx.x % 32;
    const bool holds_request = lane < batch;
    const int pages = holds_request ? pages_of_len(seqlens[lane]) : 0;
    const int cost = holds_request ? pages + overhead : 0;
    const int start_next = warp_inclusive_scan(cost);
    const int total = __shfl_sync(FULL_WARP, start_next, 31);
    const int max_cost = __reduce_max_sync(FULL_WARP, cost);
    const bool whole = whole_requests && whole_requests_fit(batch, num_parts, total, max_cost, overhead);
    const int payload = whole ? max_cost : part_payload(total, max_cost, num_parts, slack_16ths);
    const int start = whole ? lane * max_cost : start_next - cost;

    // This lane's span (as span_of), and past the batch keys that no search counts.
    const Span span = !holds_request ? Span{NO_REQUEST_KEY, NO_REQUEST_KEY}
                      : pages == 0   ? Span{start, start}
                                     : Span{start + overhead, start + overhead + pages - 1};
    const int splits = holds_request ? span.last / payload - span.first / payload + 1 : 0;
    const int split_prefix = warp_inclusive_scan(splits) - splits;
    if (threadIdx.x < 32) {
        if (holds_request) num_splits[lane] = split_prefix;
        if (lane == 31) num_splits[batch] = split_prefix + splits;
    }

    // Parts: a warp-uniform loop so that every lane joins the shuffles.
    for (int base = threadIdx.x - lane; base < num_parts; base += SMALL_SCHEDULE_THREADS) {
        const int part = base + lane;
        const int lo = part * payload, hi = lo + payload;
        const int begin_req = warp_count_below(span.last, lo);  // first request with last >= lo
        const int end_req = warp_count_below(span.first, hi) - 1;  // last request with first < hi
        const int begin_lane = begin_req < 31 ? begin_req : 31, end_lane = end_req > 0 ? end_req : 0;
        const Span first = {__shfl_sync(FULL_WARP, span.first, begin_lane), __shfl_sync(FULL_WARP, span.last, begin_lane)};
        const Span last = {__shfl_sync(FULL_WARP, span.first, end_lane), __shfl_sync(FULL_WARP, span.last, end_lane)};
        const int last_pages = __shfl_sync(FULL_WARP, pages, end_lane);
        const int first_split = __shfl_sync(FULL_WARP, split_prefix, begin_lane);
        if (part < num_parts)
            write_part_row(metadata + part * METADATA_FIELDS, part, payload, begin_req, end_req, first, last,
                           last_pages, first_split);
    }
}
