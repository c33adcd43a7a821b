"""The split-KV schedule: which SM part processes which (request, page range).

The GPU computes it (``kernels/mla_schedule.cu``); this module holds the sizing rule shared
with the launcher and a Python mirror of the kernel's greedy split, used for CPU tensors and
to test the kernel.
"""

from __future__ import annotations

import torch

from ._constants import (
    BLOCK_M,
    METADATA_FIELDS,
    MD_BEGIN_PAGE,
    MD_BEGIN_REQ,
    MD_BEGIN_SPLIT,
    MD_END_PAGE,
    MD_END_REQ,
    PAGE_SIZE,
    SPLIT_OVERHEAD_PAGES,
)


def num_m_blocks(num_q_tokens_per_head_k: int) -> int:
    """64-row query blocks per KV head: ``ceil(s_q * h_q / h_k / 64)``."""
    return -(-num_q_tokens_per_head_k // BLOCK_M)


def num_sm_parts(num_sms: int, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """How many parts the batch is split into, so that parts x m-blocks x KV heads fill the SMs."""
    return max(1, num_sms // (num_heads_k * num_m_blocks(num_q_tokens_per_head_k)))


def schedule_reference(cache_seqlens: torch.Tensor, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Python mirror of ``mla_schedule``: returns ``(metadata [num_parts, 8], num_splits [b+1])``.

    Each request costs its pages plus a fixed overhead; parts take equal shares of the total
    and split a request where a share ends.
    """
    lengths = cache_seqlens.tolist()
    batch = len(lengths)
    pages_of = [-(-n // PAGE_SIZE) if n > 0 else 0 for n in lengths]
    total = sum(p + SPLIT_OVERHEAD_PAGES for p in pages_of)
    payload = -(-total // num_parts) + SPLIT_OVERHEAD_PAGES
    metadata = [[0] * METADATA_FIELDS for _ in range(num_parts)]
    num_splits = [0] * (batch + 1)
    req = page = splits_in_req = splits_done = 0
    for part in range(num_parts):
        row = metadata[part]
        row[MD_BEGIN_REQ], row[MD_BEGIN_PAGE] = req, page
        row[MD_BEGIN_SPLIT] = splits_done + splits_in_req
        budget, ends_mid_request = payload, False
        while req < batch:
            cost = pages_of[req] - page + SPLIT_OVERHEAD_PAGES
            if budget >= cost:
                budget -= cost
                splits_done += splits_in_req + 1
                num_splits[req + 1] = splits_done
                req, page, splits_in_req = req + 1, 0, 0
            else:
                take = budget - SPLIT_OVERHEAD_PAGES
                if take > 0:
                    page += take
                    splits_in_req += 1
                    ends_mid_request = True
                break
        if ends_mid_request:
            row[MD_END_REQ], row[MD_END_PAGE] = req, page
        else:
            row[MD_END_REQ] = req - 1
            row[MD_END_PAGE] = pages_of[req - 1] if req > 0 else 0
    return (torch.tensor(metadata, dtype=torch.int32), torch.tensor(num_splits, dtype=torch.int32))
