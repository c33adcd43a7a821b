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
)
from .settings import settings


def num_m_blocks(num_q_tokens_per_head_k: int) -> int:
    """64-row query blocks per KV head: ``ceil(s_q * h_q / h_k / 64)``."""
    return -(-num_q_tokens_per_head_k // BLOCK_M)


def num_sm_parts(num_sms: int, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """How many parts the batch is split into, so that parts x m-blocks x KV heads fill the SMs.

    ``FLASHMLA_BACKEND_MAX_SM_PARTS`` caps it (a tuning knob for experiments: with 128
    equal-length requests and 128 parts, no request is split and the combine has no work);
    unset or empty means no cap."""
    parts = max(1, num_sms // (num_heads_k * num_m_blocks(num_q_tokens_per_head_k)))
    cap = settings().max_sm_parts
    return parts if cap is None else min(parts, cap)


def split_overhead_pages() -> int:
    """The scheduler's cost of one (request, split) in pages: the Q load, the output write and
    the combine. ``FLASHMLA_BACKEND_SPLIT_OVERHEAD`` overrides it (a tuning knob)."""
    return settings().split_overhead_pages


def no_split_slack() -> int:
    """How far (in 16ths of a part) the scheduler may grow a part to keep the costliest request
    whole: a split costs more than its modelled overhead (the partial write and the combine).
    ``FLASHMLA_BACKEND_NO_SPLIT_SLACK`` overrides it (a tuning knob, 0 to 16: 0 turns the rule
    off, 16 lets a part double)."""
    return settings().no_split_slack


def whole_requests() -> bool:
    """Whether the scheduler's whole-request rule is on (the default; ``FLASHMLA_BACKEND_WHOLE_REQUESTS=0``
    turns it off): with no more requests than parts, and the costliest request within one split
    overhead of the even share, every request gets a part of its own.
    The cost model charges a piece's overhead where its request starts, so an even share can
    still hand one part the pieces of two short requests back to back: 128 requests of 32-96
    keys ran 26.2 µs against 17.5 µs for 64 keys each (H100, run 29); with the rule, 21.4 µs
    against 27.2 (H100, run 30)."""
    return settings().whole_requests


def uses_whole_requests(batch: int, num_parts: int, total: int, max_cost: int, overhead: int) -> bool:
    """The whole-request rule's condition (as ``whole_requests_fit`` in ``mla_schedule.cu``)."""
    even_payload = -(-total // num_parts)
    return 0 < max_cost <= even_payload + overhead and batch <= num_parts


def schedule_reference(cache_seqlens: torch.Tensor, num_parts: int, overhead: int | None = None,
                       slack_16ths: int | None = None,
                       whole: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Python mirror of ``mla_schedule``: returns ``(metadata [num_parts, 8], num_splits [b+1])``.

    Request i occupies ``overhead + pages_i`` consecutive cost positions (overhead first);
    part p owns positions ``[p * payload, (p + 1) * payload)``, ``payload = ceil(total / parts)``,
    grown to the costliest request when that is at most ``slack_16ths`` 16ths larger.
    A request is split wherever a part boundary cuts its pages; a request without pages belongs
    to the part that holds its first position. With ``whole`` (default: the setting) and
    :func:`uses_whole_requests`, every request is padded to the costliest one's positions and the
    payload is that cost: part i runs request i alone.
    """
    overhead = split_overhead_pages() if overhead is None else overhead
    slack_16ths = no_split_slack() if slack_16ths is None else slack_16ths
    whole = whole_requests() if whole is None else whole
    lengths = cache_seqlens.to("cpu", torch.int64).clamp_min(0)
    batch = lengths.shape[0]
    pages = (lengths + PAGE_SIZE - 1) // PAGE_SIZE
    start = torch.zeros(batch + 1, dtype=torch.int64)
    start[1:] = torch.cumsum(pages + overhead, 0)
    payload = -(-int(start[-1]) // num_parts)
    max_cost = int((pages + overhead).max()) if batch else 0
    if whole and uses_whole_requests(batch, num_parts, int(start[-1]), max_cost, overhead):
        start = torch.arange(batch + 1, dtype=torch.int64) * max_cost
        payload = max_cost
    elif payload < max_cost and max_cost * 16 <= payload * (16 + slack_16ths):
        payload = max_cost
    first = torch.where(pages > 0, start[:-1] + overhead, start[:-1])
    last = torch.where(pages > 0, start[:-1] + overhead + pages - 1, start[:-1])
    splits = last // payload - first // payload + 1
    num_splits = torch.zeros(batch + 1, dtype=torch.int64)
    num_splits[1:] = torch.cumsum(splits, 0)

    metadata = torch.zeros(num_parts, METADATA_FIELDS, dtype=torch.int64)
    lo = torch.arange(num_parts, dtype=torch.int64) * payload
    hi = lo + payload
    begin = torch.searchsorted(last, lo)  # first request with last >= lo
    end = torch.searchsorted(first, hi) - 1  # last request with first < hi
    metadata[:, MD_BEGIN_REQ] = begin
    metadata[:, MD_END_REQ] = end
    for part in range(num_parts):
        b, e = int(begin[part]), int(end[part])
        if b > e:
            continue
        lo_p, hi_p = int(lo[part]), int(hi[part])
        metadata[part, MD_BEGIN_PAGE] = max(lo_p - int(first[b]), 0)
        metadata[part, MD_END_PAGE] = 0 if pages[e] == 0 else min(hi_p, int(last[e]) + 1) - int(first[e])
        metadata[part, MD_BEGIN_SPLIT] = int(num_splits[b]) + part - int(first[b]) // payload
    return metadata.to(torch.int32), num_splits.to(torch.int32)


def pages_per_part(metadata: torch.Tensor, cache_seqlens: torch.Tensor) -> list[int]:
    """Pages each part of ``metadata [parts, 8]`` streams (0 for an idle part), e.g. to set
    timings beside part sizes (``benchmarks/producer_map.py``)."""
    lengths = cache_seqlens.to("cpu", torch.int64).tolist()
    pages = []
    for row in metadata.to("cpu", torch.int64).tolist():
        begin, end = row[MD_BEGIN_REQ], row[MD_END_REQ]
        total = 0
        for req in range(begin, end + 1):
            first = row[MD_BEGIN_PAGE] if req == begin else 0
            last = row[MD_END_PAGE] if req == end else -(-lengths[req] // PAGE_SIZE)
            total += last - first
        pages.append(total)
    return pages
