"""Which producer loads the KV pages in the decode kernel: TMA or cp.async.

Both live in ``kernels/mla_decode.cu`` behind a launch argument. cp.async (all 128 producer
threads, 16-byte copies) measured faster only where every page is read once, i.e. one query
block per KV head, and only on some cards; TMA (one thread) everywhere else. Measured in one
process per card (``benchmarks/NOTES.md``, "v17" and "v18"):

* H100 SXM (3.35 TB/s): cp.async +1.4-2.6% on the memory and mixed rows (varlen -0.4%),
  +5% at b = 1;
* H200 (4.8 TB/s): cp.async 9-11% slower on the same rows;
* both: cp.async ~20% slower where several query blocks re-read each page from L2.

``FLASHMLA_BACKEND_KV_PRODUCER`` overrides the rule: ``auto`` (default), ``tma`` (never
cp.async) or ``cp_async`` (every launch, several query blocks included: for tests and A/B runs).
"""

from __future__ import annotations


import torch

from .settings import settings

#: Device-name fragments of the cards where cp.async measured faster for one query block.
CP_ASYNC_CARDS: tuple[str, ...] = ("H100",)

_card_prefers_cp_async: dict[int, bool] = {}


def kv_producer_setting() -> str:
    """The ``FLASHMLA_BACKEND_KV_PRODUCER`` setting (``auto`` when unset or empty)."""
    return settings().kv_producer


def card_prefers_cp_async(device_name: str) -> bool:
    """True for the cards in ``CP_ASYNC_CARDS`` (e.g. ``"NVIDIA H100 80GB HBM3"``)."""
    return any(fragment in device_name for fragment in CP_ASYNC_CARDS)


def load_by_cp_async(device_index: int, m_blocks: int) -> bool:
    """Whether a decode launch with ``m_blocks`` query blocks per KV head on GPU
    ``device_index`` loads its pages by cp.async (else TMA)."""
    setting = kv_producer_setting()
    if setting != "auto":
        return setting == "cp_async"
    if m_blocks != 1:
        return False
    prefers = _card_prefers_cp_async.get(device_index)
    if prefers is None:
        prefers = _card_prefers_cp_async[device_index] = card_prefers_cp_async(
            torch.cuda.get_device_name(device_index))
    return prefers
