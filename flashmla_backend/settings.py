"""Every ``FLASHMLA_BACKEND_*`` environment setting, parsed once per process.

A decode call used to read fourteen environment variables, at 1-2 µs of host time each. They
are now parsed together on first use and cached; a bad value raises a ``ValueError`` that names
the variable, on that first use. A process that changes these variables afterwards (tests, a
notebook) calls ``reload_settings()``; the benchmark scripts set them before Python starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ._constants import COMBINE_MAX_REQUESTS_PER_CTA, NO_SPLIT_SLACK_16THS, SPLIT_OVERHEAD_PAGES

KV_PRODUCER_ENV = "FLASHMLA_BACKEND_KV_PRODUCER"
KV_PRODUCER_CHOICES = ("auto", "tma", "cp_async")
PROGRAMMATIC_LAUNCH_ENV = "FLASHMLA_BACKEND_PDL"
L2_PROMOTION_256B = 3  # the tensor map's NONE, 64B, 128B, 256B = 0..3


@dataclass(frozen=True)
class Settings:
    """The parsed settings (defaults when a variable is unset or empty).

    ``decode_file`` / ``combine_file``: the kernel sources (``FLASHMLA_BACKEND_DECODE_FILE`` /
    ``_COMBINE_FILE``, a path, for A/B runs of archived versions); ``decode_defines`` /
    ``combine_defines``: their extra ``-D`` options (``_DECODE_DEFINES`` / ``_COMBINE_DEFINES``);
    ``kv_producer``: ``auto``, ``tma`` or ``cp_async`` (``_KV_PRODUCER``); ``programmatic_launch``:
    the decode and the combine by programmatic dependent launch (``_PDL``: 1, the default, or
    0); ``max_sm_parts``: a cap on the scheduler's parts, or None (``_MAX_SM_PARTS``); ``split_overhead_pages``, ``no_split_slack``:
    the scheduler's cost knobs (``_SPLIT_OVERHEAD``, ``_NO_SPLIT_SLACK``); ``tma_l2_promotion``:
    the KV map's L2 promotion 0-3 (``_TMA_L2_PROMOTION``); ``small_schedule``: batches of at most
    32 requests take the one-warp scheduler (``_SMALL_SCHEDULE``: 1, the default, or 0 for the
    CTA-wide one); ``combine_requests_per_cta``: requests one combine CTA serves (1-32, or 0,
    the default: the fewest that keep its grid within one wave; ``_COMBINE_REQUESTS_PER_CTA``);
    ``whole_requests``: the scheduler's whole-request rule (``_WHOLE_REQUESTS``: 1, the default,
    or 0; ``schedule.whole_requests``); ``check_contents``: the content checks
    of GPU tensors (``_CHECK_CONTENTS=0`` turns them off); ``split_query``: the vLLM backend
    hands the decode vLLM's latent and RoPE query halves as they are (``_SPLIT_QUERY``: 1, the
    default, or 0 to concatenate them first, as vLLM's FlashMLA backend does);
    ``few_rows_decode_file``: a decode version (a path) used instead of the main one for calls
    with at most its ``MAX_QUERY_ROWS`` query rows per KV head, while ``decode_file`` is the
    shipped one (``_FEW_ROWS_DECODE_FILE``; empty, the default: one decode for every shape)."""

    decode_file: str = "mla_decode.cu"
    decode_defines: tuple[str, ...] = ()
    combine_file: str = "mla_combine.cu"
    combine_defines: tuple[str, ...] = ()
    kv_producer: str = "auto"
    programmatic_launch: bool = True
    max_sm_parts: int | None = None
    split_overhead_pages: int = SPLIT_OVERHEAD_PAGES
    no_split_slack: int = NO_SPLIT_SLACK_16THS
    tma_l2_promotion: int = L2_PROMOTION_256B
    small_schedule: bool = True
    combine_requests_per_cta: int = 0
    whole_requests: bool = True
    check_contents: bool = True
    split_query: bool = True
    few_rows_decode_file: str = ""


def _defines(variable: str) -> tuple[str, ...]:
    knobs = tuple(os.environ.get(variable, "").split())
    if any(not k.startswith("-D") for k in knobs):
        raise ValueError(f"{variable} must hold only -D options, got {knobs}")
    return knobs


def _kv_producer() -> str:
    value = os.environ.get(KV_PRODUCER_ENV, "") or "auto"
    if value not in KV_PRODUCER_CHOICES:
        raise ValueError(f"{KV_PRODUCER_ENV}: expected one of {KV_PRODUCER_CHOICES}, got {value!r}")
    return value


def _int(variable: str, default: int | None, low: int, high: int | None = None) -> int | None:
    """The integer in ``variable`` (``default`` when unset or empty), within [low, high]."""
    raw = os.environ.get(variable, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < low or (high is not None and int(raw) > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{variable}: expected an integer {bound}, got {raw!r}")
    return int(raw)


def read_settings() -> Settings:
    """Parses every setting from the environment now (no cache)."""
    return Settings(
        decode_file=os.environ.get("FLASHMLA_BACKEND_DECODE_FILE") or "mla_decode.cu",
        decode_defines=_defines("FLASHMLA_BACKEND_DECODE_DEFINES"),
        combine_file=os.environ.get("FLASHMLA_BACKEND_COMBINE_FILE") or "mla_combine.cu",
        combine_defines=_defines("FLASHMLA_BACKEND_COMBINE_DEFINES"),
        kv_producer=_kv_producer(),
        programmatic_launch=_int(PROGRAMMATIC_LAUNCH_ENV, 1, 0, 1) == 1,
        max_sm_parts=_int("FLASHMLA_BACKEND_MAX_SM_PARTS", None, 1),
        split_overhead_pages=_int("FLASHMLA_BACKEND_SPLIT_OVERHEAD", SPLIT_OVERHEAD_PAGES, 1),
        no_split_slack=_int("FLASHMLA_BACKEND_NO_SPLIT_SLACK", NO_SPLIT_SLACK_16THS, 0, 16),
        tma_l2_promotion=_int("FLASHMLA_BACKEND_TMA_L2_PROMOTION", L2_PROMOTION_256B, 0, 3),
        small_schedule=_int("FLASHMLA_BACKEND_SMALL_SCHEDULE", 1, 0, 1) == 1,
        combine_requests_per_cta=_int("FLASHMLA_BACKEND_COMBINE_REQUESTS_PER_CTA", 0, 0,
                                      COMBINE_MAX_REQUESTS_PER_CTA),
        whole_requests=_int("FLASHMLA_BACKEND_WHOLE_REQUESTS", 1, 0, 1) == 1,
        check_contents=os.environ.get("FLASHMLA_BACKEND_CHECK_CONTENTS", "1") != "0",
        split_query=_int("FLASHMLA_BACKEND_SPLIT_QUERY", 1, 0, 1) == 1,
        few_rows_decode_file=os.environ.get("FLASHMLA_BACKEND_FEW_ROWS_DECODE_FILE", ""),
    )


_cached: Settings | None = None


def settings() -> Settings:
    """The process's settings, parsed on first use (see ``reload_settings``)."""
    global _cached
    if _cached is None:
        _cached = read_settings()
    return _cached


def reload_settings() -> None:
    """Forgets the parsed settings: the next ``settings()`` reads the environment again."""
    global _cached
    _cached = None
