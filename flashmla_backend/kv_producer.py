"""Which producer loads the KV pages in the decode kernel: TMA or cp.async.

Both live in ``kernels/mla_decode.cu``. The launch passes ``cp_async_part_pages``: each CTA
whose scheduler part streams at most that many pages loads them by cp.async (all 128 producer
threads, 16-byte copies), any other CTA by TMA (one thread). cp.async measured faster only
where every page is read once, i.e. one query block per KV head (``benchmarks/NOTES.md``,
"v17", "v18", "v22"; one process per card):

* H100 SXM (3.35 TB/s): cp.async +1.4-2.6% on the memory and mixed rows (varlen -0.4%),
  +5% at b = 1, so every part of a one-block launch uses it;
* H200 (4.8 TB/s): cp.async 9-11% slower on the memory rows (parts of 64-124 pages) but
  4-7% faster at b = 1 (parts of a few pages), so only short parts use it;
* both: cp.async ~20% slower where several query blocks re-read each page from L2.

``FLASHMLA_BACKEND_KV_PRODUCER`` overrides the rule: ``auto`` (default), ``tma`` (never
cp.async) or ``cp_async`` (every part of every launch, several query blocks included: for
tests and A/B runs). ``FLASHMLA_BACKEND_CP_ASYNC_PART_PAGES`` sets the short-part limit of the
``auto`` rule on cards other than the H100 (an A/B knob; 0 turns short parts off).
"""

from __future__ import annotations

import os

import torch

KV_PRODUCER_ENV = "FLASHMLA_BACKEND_KV_PRODUCER"
KV_PRODUCER_CHOICES = ("auto", "tma", "cp_async")
SHORT_PART_PAGES_ENV = "FLASHMLA_BACKEND_CP_ASYNC_PART_PAGES"
#: Device-name fragments of the cards where cp.async measured faster for one query block.
CP_ASYNC_CARDS: tuple[str, ...] = ("H100",)
#: ``cp_async_part_pages`` meaning every part (the kernel's ``CP_ASYNC_ALWAYS``).
CP_ASYNC_ALWAYS = 1 << 30
#: On the other cards, parts of at most this many pages use cp.async (one query block only).
SHORT_PART_PAGES = 16

_card_prefers_cp_async: dict[int, bool] = {}


def kv_producer_setting() -> str:
    """The ``FLASHMLA_BACKEND_KV_PRODUCER`` setting (``auto`` when unset or empty)."""
    value = os.environ.get(KV_PRODUCER_ENV, "") or "auto"
    if value not in KV_PRODUCER_CHOICES:
        raise ValueError(f"{KV_PRODUCER_ENV}: expected one of {KV_PRODUCER_CHOICES}, got {value!r}")
    return value


def short_part_pages() -> int:
    """The short-part limit of the ``auto`` rule (``FLASHMLA_BACKEND_CP_ASYNC_PART_PAGES``)."""
    raw = os.environ.get(SHORT_PART_PAGES_ENV, "")
    if raw == "":
        return SHORT_PART_PAGES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{SHORT_PART_PAGES_ENV}: expected an integer >= 0, got {raw!r}")
    return value


def card_prefers_cp_async(device_name: str) -> bool:
    """True for the cards in ``CP_ASYNC_CARDS`` (e.g. ``"NVIDIA H100 80GB HBM3"``)."""
    return any(fragment in device_name for fragment in CP_ASYNC_CARDS)


def cp_async_part_pages(device_index: int, m_blocks: int) -> int:
    """The decode argument for a launch with ``m_blocks`` query blocks per KV head on GPU
    ``device_index``: parts of at most this many pages load by cp.async (0: none;
    ``CP_ASYNC_ALWAYS``: all)."""
    setting = kv_producer_setting()
    if setting != "auto":
        return CP_ASYNC_ALWAYS if setting == "cp_async" else 0
    if m_blocks != 1:
        return 0
    prefers = _card_prefers_cp_async.get(device_index)
    if prefers is None:
        prefers = _card_prefers_cp_async[device_index] = card_prefers_cp_async(
            torch.cuda.get_device_name(device_index))
    return CP_ASYNC_ALWAYS if prefers else short_part_pages()
