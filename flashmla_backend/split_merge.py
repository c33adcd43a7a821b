"""Where a split request's partial outputs are merged: in the decode kernel or by the combine.

A decode source that declares ``MERGES_SPLITS`` takes an int32 counter per (request, KV head,
query block). Given one, the last CTA to finish a split piece merges that request's partials
itself and the API launches no combine kernel; given a null pointer, the combine kernel does
the merging as before. The in-kernel merge runs on one CTA per (request, block, KV head), so
it only pays where requests have few splits (large batches); the combine spreads a request
split many ways (small batches) over many warps.

``FLASHMLA_BACKEND_SPLIT_MERGE`` overrides the rule: ``auto`` (default), ``combine`` (always
the combine kernel) or ``decode`` (always in the decode: for tests and A/B runs).
"""

from __future__ import annotations

import os

import torch

SPLIT_MERGE_ENV = "FLASHMLA_BACKEND_SPLIT_MERGE"
SPLIT_MERGE_CHOICES = ("auto", "combine", "decode")
#: ``auto`` merges in the decode when the scheduler's parts are at most this many per request
#: (equal lengths then give at most about two splits per request).
MAX_PARTS_PER_REQUEST_FOR_DECODE_MERGE = 2

_counters: dict[int, torch.Tensor] = {}
# Replaced counter buffers stay alive: a CUDA graph captured with one keeps using its address.
_retired_counters: list[torch.Tensor] = []


def split_merge_setting() -> str:
    """The ``FLASHMLA_BACKEND_SPLIT_MERGE`` setting (``auto`` when unset or empty)."""
    value = os.environ.get(SPLIT_MERGE_ENV, "") or "auto"
    if value not in SPLIT_MERGE_CHOICES:
        raise ValueError(f"{SPLIT_MERGE_ENV}: expected one of {SPLIT_MERGE_CHOICES}, got {value!r}")
    return value


def merge_in_decode(batch: int, parts: int) -> bool:
    """Whether a launch of ``batch`` requests over ``parts`` scheduler parts merges its splits
    in the decode kernel (else the combine kernel does)."""
    setting = split_merge_setting()
    if setting != "auto":
        return setting == "decode"
    return parts <= MAX_PARTS_PER_REQUEST_FOR_DECODE_MERGE * batch


def merge_counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 counters ``[count]`` on ``device``, grown on demand and reused. The decode
    returns each counter to zero after its merge, so they stay zero between launches."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cached = _counters.get(index)
    if cached is None or cached.numel() < count:
        if cached is not None:
            _retired_counters.append(cached)
            count = max(count, 2 * cached.numel())
        cached = _counters[index] = torch.zeros((count,), dtype=torch.int32, device=device)
    return cached
