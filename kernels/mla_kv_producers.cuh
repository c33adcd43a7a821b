// The decode's KV producers: the walk over a part's pages in ring order, and the two ways a
// page reaches its stage (TMA from one thread, cp.async from a warpgroup). Shared by the decode
// versions; `Tiles` is a version's shared-memory map (kv(stage), full_bar(), empty_bar()) and
// STAGES its ring depth. flashmla_backend/kv_producer.py picks the producer per launch.
#pragma once
#include "mla_decode_shared.cuh"

// Knob (on), set together with the combine's SPLITS_BEFORE_WAIT: dependents (the combine) are
// released by the producer after its first page, i.e. after this CTA's dependency wait, so that
// the combine may read the scheduler's num_splits before its own wait (run 20, H100: b = 1 whole
// call -1.2 us, b = 8 +0.3 us).
#ifndef DEPENDENTS_AFTER_FIRST_ISSUE
#define DEPENDENTS_AFTER_FIRST_ISSUE 1
#endif

// Walks every page of every piece in ring order: waits until the page's stage is free, then
// hands (stage, page id) to fill_stage, which must make the full barrier complete.
template <int STAGES, typename Tiles, typename FillStage>
DEVICE void for_each_ring_page(const DecodeArgs& a, const Tiles& sm, FillStage fill_stage) {
    int it = 0;
    for (int req = a.work.begin_req; req <= a.work.end_req; ++req) {
        const Piece piece = piece_of(a.work, req, a.seqlens, a.num_splits);
        const int* pages = a.block_table + (size_t)req * a.bt_stride;
        int page_id = piece.page_begin < piece.page_end ? pages[piece.page_begin] : 0;
        for (int page = piece.page_begin; page < piece.page_end; ++page, ++it) {
            // Issued before the wait, used after the next one: its latency hides behind them.
            const int next_page_id = page + 1 < piece.page_end ? pages[page + 1] : 0;
            const int stage = it % STAGES;
            mbarrier_wait(&sm.empty_bar()[stage], ((it / STAGES) & 1) ^ 1);
            fill_stage(stage, page_id);
            // One thread's release counts for the CTA (the cp.async producer's 128 all release).
            if (DEPENDENTS_AFTER_FIRST_ISSUE && it == 0) allow_dependent_launch();
            page_id = next_page_id;
        }
    }
}

// TMA producer: one thread streams every page of every piece through the KV ring.
template <int STAGES, typename Tiles>
DEVICE void run_tma_producer(const DecodeArgs& a, const Tiles& sm) {
    // One query block streams each page once; several blocks re-read it from L2.
    const uint64_t policy = a.kv_evict_first ? l2_policy_evict_first() : l2_policy_evict_last();
    bool first = true;
    for_each_ring_page<STAGES>(a, sm, [&](int stage, int page_id) {
        mbarrier_arrive_expect_tx(&sm.full_bar()[stage], TILE_BYTES);
#pragma unroll
        for (int c = 0; c < QK_CHUNKS; ++c)
            tma_load_4d(sm.kv(stage) + c * CHUNK_BYTES, a.kv_map, &sm.full_bar()[stage],
                        c * CHUNK_COLS, a.kh, 0, page_id, policy);
        if (TRACE_PHASES && first) trace_phase(EV_FIRST_KV_ISSUED);
        first = false;
    });
}

// cp.async producer: all 128 threads copy every page by cp.async, in the 128B-swizzled
// chunks the wgmma descriptors expect. Each thread waits for its own copies and fences them to
// the async proxy before it arrives, so the consumers' wgmma read the stage with no fence.
template <int STAGES, typename Tiles>
DEVICE void run_cp_async_producer(const DecodeArgs& a, const Tiles& sm, const uint16_t* k_cache,
                                  long long page_stride, long long token_stride, int tid) {
    for_each_ring_page<STAGES>(a, sm, [&](int stage, int page_id) {
        copy_page_cp_async(sm.kv(stage), k_cache + (size_t)page_id * page_stride + a.kh * HEAD_DIM_QK,
                           token_stride, tid);
        cp_async_wait_all();
        fence_proxy_async_smem();
        mbarrier_arrive(&sm.full_bar()[stage]);
    });
}
