// GPU scheduler: splits the paged KV work of a batch evenly across SM "parts".
// One CTA; the schedule depends only on cache_seqlens, so it is computed once per decode
// step, never syncs with the host and can be captured in a CUDA graph.
#include "ptx_helpers.cuh"
#include "mla_common.cuh"

constexpr int SCHEDULE_THREADS = 256;

// seqlens: int32 [batch]. metadata: int32 [num_parts, METADATA_FIELDS].
// num_splits: int32 [batch + 1], prefix sum of the splits of each request.
// Dynamic smem: int32 [batch] pages per request.
extern "C" __global__ void __launch_bounds__(SCHEDULE_THREADS)
mla_schedule(const int* __restrict__ seqlens, int batch, int num_parts,
             int* __restrict__ metadata, int* __restrict__ num_splits) {
    extern __shared__ int pages_of[];
    __shared__ int partial[SCHEDULE_THREADS];

    int local_total = 0;
    for (int i = threadIdx.x; i < batch; i += SCHEDULE_THREADS) {
        int len = seqlens[i];
        int pages = len > 0 ? (len + PAGE_SIZE - 1) / PAGE_SIZE : 0;
        pages_of[i] = pages;
        local_total += pages + SPLIT_OVERHEAD_PAGES;
    }
    partial[threadIdx.x] = local_total;
    __syncthreads();
    if (threadIdx.x != 0) return;

    int total = 0;
    for (int t = 0; t < SCHEDULE_THREADS; ++t) total += partial[t];
    // The extra overhead per part pays for the one split each part may add, so the parts
    // always cover the whole batch.
    const int payload = (total + num_parts - 1) / num_parts + SPLIT_OVERHEAD_PAGES;

    int req = 0, page = 0, splits_in_req = 0, splits_done = 0;
    num_splits[0] = 0;
    for (int part = 0; part < num_parts; ++part) {
        int* row = metadata + part * METADATA_FIELDS;
        row[MD_BEGIN_REQ] = req;
        row[MD_BEGIN_PAGE] = page;
        row[MD_BEGIN_SPLIT] = splits_done + splits_in_req;
        int budget = payload;
        bool ends_mid_request = false;
        while (req < batch) {
            const int cost = pages_of[req] - page + SPLIT_OVERHEAD_PAGES;
            if (budget >= cost) {  // the rest of this request fits in this part
                budget -= cost;
                splits_done += splits_in_req + 1;
                num_splits[req + 1] = splits_done;
                ++req;
                page = 0;
                splits_in_req = 0;
            } else {
                const int take = budget - SPLIT_OVERHEAD_PAGES;
                if (take > 0) {  // split this request here
                    page += take;
                    ++splits_in_req;
                    ends_mid_request = true;
                }
                break;
            }
        }
        if (ends_mid_request) {
            row[MD_END_REQ] = req;
            row[MD_END_PAGE] = page;
        } else {
            row[MD_END_REQ] = req - 1;
            row[MD_END_PAGE] = req > 0 ? pages_of[req - 1] : 0;
        }
        row[5] = row[6] = row[7] = 0;
    }
}
