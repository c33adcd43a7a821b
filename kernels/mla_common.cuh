// Shapes, tile sizes and the scheduler-metadata layout shared by the MLA kernels and
// mirrored in flashmla_backend/_constants.py.
#pragma once

constexpr int HEAD_DIM_QK = 576;        // 512 latent (kv_lora_rank) + 64 RoPE
constexpr int HEAD_DIM_V = 512;         // V = first 512 columns of each cache row
constexpr int PAGE_SIZE = 64;           // tokens per KV-cache page = keys per tile
constexpr int BLOCK_M = 64;             // query rows (s_q x heads of one KV head) per CTA


// One row of tile_scheduler_metadata (int32 [num_sm_parts, METADATA_FIELDS]).
constexpr int METADATA_FIELDS = 8;
constexpr int MD_BEGIN_REQ = 0;          // first request of this part
constexpr int MD_BEGIN_PAGE = 1;         // its first page
constexpr int MD_END_REQ = 2;            // last request (inclusive); < begin when idle
constexpr int MD_END_PAGE = 3;           // its end page (exclusive)
constexpr int MD_BEGIN_SPLIT = 4;        // split slot of the first (request, split)
