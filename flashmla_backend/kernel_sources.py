"""Where the CUDA sources live and how each kernel module is assembled and compiled.

The sources in the top-level ``kernels/`` folder ship inside the wheel as
``flashmla_backend/kernels``. Local ``#include "x.cuh"`` lines are inlined here, so the text
handed to NVRTC is self-contained and CuPy's on-disk cache key covers every header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ._constants import DECODE_SMEM_BYTES, PAGE_SIZE
from .launch import KernelSignature
from .settings import Settings, settings

#: NVRTC options for every module. sm_90a unlocks wgmma, TMA and setmaxnreg. Flush-to-zero is
#: part of the decode's contract, not only CuPy's default (CuPy appends it too): the softmax's
#: 2^x on the FMA pipe turns a masked score into a denormal pattern that must flush to 0, so that
#: a row with no key sums to 0 (out 0, lse +inf; ``tests/test_softmax_host.py``).
NVRTC_OPTIONS: tuple[str, ...] = ("-arch=sm_90a", "-std=c++17", "-ftz=true")

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


@dataclass(frozen=True)
class KernelModule:
    """One NVRTC compilation unit: a ``.cu`` file, its entry points, a 16-bit dtype and any
    extra ``-D`` options."""

    source_file: str
    entry_points: tuple[str, ...]
    dtype: torch.dtype
    extra_defines: tuple[str, ...] = ()

    @property
    def defines(self) -> tuple[str, ...]:
        return (("-DMLA_FP16",) if self.dtype == torch.float16 else ()) + self.extra_defines

    @property
    def options(self) -> tuple[str, ...]:
        return NVRTC_OPTIONS + self.defines


SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)

SCHEDULE_MODULE = KernelModule("mla_schedule.cu", ("mla_schedule", "mla_schedule_small"), torch.bfloat16)


def decode_launch_defines() -> tuple[str, ...]:
    """What every decode source is told about its launch: the dynamic shared memory the API
    reserves, which the source's own smem map must fit (a static_assert)."""
    return (f"-DMLA_LAUNCH_SMEM_BYTES={DECODE_SMEM_BYTES}",)


def decode_module(dtype: torch.dtype, programmatic: bool = False) -> KernelModule:
    """The split-KV decode kernel for ``dtype`` (bf16 or fp16); ``programmatic``: the variant
    that lets a programmatically launched combine be scheduled early.

    ``FLASHMLA_BACKEND_DECODE_FILE`` (a path) swaps in another version of the decode source
    with the same interface, for A/B benchmarks of kernel versions in one process; unset or
    empty means the shipped source. ``FLASHMLA_BACKEND_DECODE_DEFINES`` adds ``-D`` options
    (space-separated, e.g. ``-DDIAG_STAGES=3``) for such a version's knobs.
    """
    s = settings()
    extra = decode_launch_defines() + s.decode_defines + (("-DMLA_PROGRAMMATIC_LAUNCH",) if programmatic else ())
    return KernelModule(s.decode_file, ("mla_decode",), dtype, extra)


def few_rows_decode_module(dtype: torch.dtype, programmatic: bool = False) -> KernelModule | None:
    """The decode for calls with few query rows per KV head (``FLASHMLA_BACKEND_FEW_ROWS_DECODE_FILE``,
    a version declaring ``MAX_QUERY_ROWS``), or None: unset, or while ``FLASHMLA_BACKEND_DECODE_FILE``
    swaps the main decode (an A/B of versions runs one decode for every shape)."""
    s = settings()
    if not s.few_rows_decode_file or s.decode_file != Settings.decode_file:
        return None
    extra = decode_launch_defines() + (("-DMLA_PROGRAMMATIC_LAUNCH",) if programmatic else ())
    module = KernelModule(s.few_rows_decode_file, ("mla_decode",), dtype, extra)
    if decode_launch_contract(module).max_query_rows is None:
        raise ValueError(f"FLASHMLA_BACKEND_FEW_ROWS_DECODE_FILE: {s.few_rows_decode_file} declares no "
                         f"MAX_QUERY_ROWS (the query rows per KV head it takes)")
    return module


_BOX_TOKENS = re.compile(r"constexpr\s+int\s+TMA_BOX_TOKENS\s*=\s*(\d+)\s*;")
_TAKES_KV_POINTER = re.compile(r"constexpr\s+bool\s+TAKES_KV_POINTER\s*=\s*true\s*;")
_SELECTS_KV_PRODUCER = re.compile(r"constexpr\s+bool\s+SELECTS_KV_PRODUCER\s*=\s*true\s*;")
_TAKES_Q_ROPE_POINTER = re.compile(r"constexpr\s+bool\s+TAKES_Q_ROPE_POINTER\s*=\s*true\s*;")
_MAX_QUERY_ROWS = re.compile(r"constexpr\s+int\s+MAX_QUERY_ROWS\s*=\s*(\d+)\s*;")


@dataclass(frozen=True)
class DecodeLaunchContract:
    """What a decode source declares about its launch, as literal ``constexpr`` lines.

    ``tma_box_tokens``: tokens per TMA box of its KV tensor map (``TMA_BOX_TOKENS``; default a
    whole 64-token page). ``takes_kv_pointer``: it takes the cache pointer and its page and
    token strides (in elements) after the common arguments (``TAKES_KV_POINTER = true``).
    ``selects_kv_producer``: it then takes an int choosing its cp.async producer over TMA
    (``SELECTS_KV_PRODUCER = true``; see ``kv_producer.py``). ``takes_q_rope_pointer``: it then
    takes the pointer to Q's 64 RoPE columns and their batch, token and head strides, so that q
    may come as a (latent, rope) pair of tensors (``TAKES_Q_ROPE_POINTER = true``). The shipped
    decode declares all three. ``max_query_rows``: the most query rows per KV head
    (``s_q * h_q / h_k``) a version takes (``MAX_QUERY_ROWS``; None: any)."""

    tma_box_tokens: int
    takes_kv_pointer: bool
    selects_kv_producer: bool = False
    takes_q_rope_pointer: bool = False
    max_query_rows: int | None = None


@lru_cache(maxsize=None)
def decode_launch_contract(module: KernelModule) -> DecodeLaunchContract:
    """The launch contract of ``module``'s decode source (read once per module)."""
    source = assembled_source(module.source_file)
    box = _BOX_TOKENS.search(source)
    takes_pointer = _TAKES_KV_POINTER.search(source) is not None
    selects = _SELECTS_KV_PRODUCER.search(source) is not None
    takes_rope = _TAKES_Q_ROPE_POINTER.search(source) is not None
    if selects and not takes_pointer:
        raise ValueError(f"{module.source_file}: SELECTS_KV_PRODUCER needs TAKES_KV_POINTER")
    if takes_rope and not selects:
        raise ValueError(f"{module.source_file}: TAKES_Q_ROPE_POINTER needs SELECTS_KV_PRODUCER")
    max_rows = _MAX_QUERY_ROWS.search(source)
    return DecodeLaunchContract(int(box.group(1)) if box else PAGE_SIZE, takes_pointer, selects, takes_rope,
                                int(max_rows.group(1)) if max_rows else None)


#: Parameters of ``mla_schedule``: seqlens, batch, parts, overhead, slack, whole_requests,
#: metadata, num_splits.
SCHEDULE_SIGNATURE = KernelSignature("mla_schedule", "Q i i i i i Q Q")
#: Parameters of ``mla_combine``: o_part, lse_part, num_splits, out, lse, s_q, h_q, h_k, warps_per_row,
#: batch.
COMBINE_SIGNATURE = KernelSignature("mla_combine", "Q Q Q Q Q i i i i i")
#: The decode parameters every version takes: the KV tensor map; q and its batch, token and
#: head strides; block_table and its row stride; seqlens, metadata, num_splits, out, lse,
#: o_part, lse_part; s_q, h_q, h_k, causal; scale_log2; kv_evict_first.
_DECODE_COMMON = "128s Q q q q Q q Q Q Q Q Q Q Q i i i i f i"


@lru_cache(maxsize=None)
def decode_signature(contract: DecodeLaunchContract) -> KernelSignature:
    """The decode's parameters under ``contract``: the common ones, then the cache pointer and
    its page and token strides (``takes_kv_pointer``), then the producer choice
    (``selects_kv_producer``), then Q's RoPE pointer and its batch, token and head strides
    (``takes_q_rope_pointer``)."""
    codes = _DECODE_COMMON + (" Q q q" if contract.takes_kv_pointer else "") + (
        " i" if contract.selects_kv_producer else "") + (" Q q q q" if contract.takes_q_rope_pointer else "")
    return KernelSignature("mla_decode", codes)


def combine_module(dtype: torch.dtype, programmatic: bool = False) -> KernelModule:
    """The split combine kernel writing ``dtype`` output; ``programmatic``: the variant that
    waits for the decode itself (``griddepcontrol.wait``), for a programmatic dependent launch.
    ``FLASHMLA_BACKEND_COMBINE_FILE`` (a path) swaps in another version of the combine source
    with the same interface, and ``FLASHMLA_BACKEND_COMBINE_DEFINES`` adds ``-D`` options for
    its A/B knobs, as for the decode."""
    s = settings()
    extra = s.combine_defines + (("-DMLA_PROGRAMMATIC_LAUNCH",) if programmatic else ())
    return KernelModule(s.combine_file, ("mla_combine",), dtype, extra)


def all_modules() -> list[KernelModule]:
    """Every module variant the API can launch (what ``precompile()`` builds)."""
    mods = [SCHEDULE_MODULE]
    for dtype in SUPPORTED_DTYPES:
        for programmatic in (False, True):
            mods += [decode_module(dtype, programmatic), combine_module(dtype, programmatic)]
            few_rows = few_rows_decode_module(dtype, programmatic)
            mods += [few_rows] if few_rows is not None else []
    return mods


def kernel_dir() -> Path:
    """The folder holding the ``.cu``/``.cuh`` sources (installed copy, else the source tree)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels", here.parent / "kernels"):
        if (candidate / "mla_decode.cu").is_file():
            return candidate
    raise FileNotFoundError(f"flashmla_backend: kernel sources not found next to {here}")


@lru_cache(maxsize=None)
def assembled_source(source_file: str) -> str:
    """``source_file`` with its local includes inlined once each (``#pragma once`` semantics)."""
    root = kernel_dir()
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = (root / name).read_text()
        text = text.replace("#pragma once", "")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(source_file)
