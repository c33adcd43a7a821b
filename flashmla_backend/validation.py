"""Argument checks for the public API.

Shape, dtype, device and stride checks cost no GPU work and run on every call. Checks that
read tensor contents (negative lengths, a block table too narrow for a sequence, page ids out
of range) need a device-to-host copy: they run for CPU tensors, and for GPU tensors once per
distinct (cache_seqlens, block_table) contents version, never during CUDA-graph capture.
Every failure is a ``TypeError`` (wrong type or dtype) or ``ValueError`` (anything else) that
names the argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._constants import HEAD_DIM_QK, HEAD_DIM_V, MAX_HEADS_PER_KV_HEAD, METADATA_FIELDS, PAGE_SIZE
from .settings import settings

_SUPPORTED = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class DecodeShape:
    """Sizes of one ``flash_mla_with_kvcache`` call."""

    batch: int
    s_q: int
    h_q: int
    h_k: int
    num_pages: int
    max_pages_per_seq: int

    @property
    def group(self) -> int:
        return self.h_q // self.h_k

    @property
    def rows(self) -> int:
        """Query rows per KV head: ``s_q * h_q / h_k``."""
        return self.s_q * self.group


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = " or ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")


def _ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(t.shape)}")


def _same_device(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of q), got {t.device}")


def _last_dim_problem(name: str, t: torch.Tensor) -> str | None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return f"{name}: the last dimension must be contiguous (stride 1), got strides {t.stride()}"
    return None


def _raise_if(problem: str | None) -> None:
    if problem is not None:
        raise ValueError(problem)


def _last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    _raise_if(_last_dim_problem(name, t))


def _int_arg(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    return v


def validate_metadata_args(cache_seqlens: object, num_q_tokens_per_head_k: object, num_heads_k: object) -> None:
    """Checks the arguments of ``get_mla_metadata``."""
    seqlens = _tensor("cache_seqlens", cache_seqlens)
    _dtype("cache_seqlens", seqlens, (torch.int32,))
    _ndim("cache_seqlens", seqlens, 1, "[batch]")
    if seqlens.shape[0] == 0:
        raise ValueError("cache_seqlens: expected at least one sequence, got an empty batch")
    _last_dim_contiguous("cache_seqlens", seqlens)
    tokens = _int_arg("num_q_tokens_per_head_k", num_q_tokens_per_head_k)
    heads = _int_arg("num_heads_k", num_heads_k)
    if tokens < 1:
        raise ValueError(f"num_q_tokens_per_head_k: expected >= 1 (s_q * h_q // h_k), got {tokens}")
    if heads < 1:
        raise ValueError(f"num_heads_k: expected >= 1, got {heads}")


def _query_part(name: str, t: object, width: int, what: str) -> torch.Tensor:
    """q, or one tensor of a (latent, rope) pair: a 16-bit ``[b, s_q, h_q, width]`` tensor."""
    t = _tensor(name, t)
    _dtype(name, t, _SUPPORTED)
    _ndim(name, t, 4, f"[batch, s_q, h_q, {width}]")
    if t.shape[-1] != width:
        raise ValueError(f"{name}: expected {width} columns ({what}) in the last dim, got {t.shape[-1]}")
    _last_dim_contiguous(name, t)
    return t


def query_parts(q: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q`` as ``(full, None)`` for one ``[b, s_q, h_q, 576]`` tensor, or ``(latent, rope)`` for a
    pair ``([b, s_q, h_q, 512], [b, s_q, h_q, 64])``; checks what tells the two forms apart and
    what a pair's halves must share (dtype, leading sizes, device)."""
    if not isinstance(q, (tuple, list)):
        return _query_part("q", q, HEAD_DIM_QK, f"{HEAD_DIM_V} latent + {HEAD_DIM_QK - HEAD_DIM_V} RoPE"), None
    if len(q) != 2 or not all(isinstance(t, torch.Tensor) for t in q):
        raise TypeError(f"q: expected a [batch, s_q, h_q, {HEAD_DIM_QK}] tensor or a (latent, rope) pair of "
                        f"[batch, s_q, h_q, {HEAD_DIM_V}] and [.., {HEAD_DIM_QK - HEAD_DIM_V}] tensors, "
                        f"got a {type(q).__name__} of {len(q)} items")
    latent = _query_part("q[0]", q[0], HEAD_DIM_V, "the latent half")
    rope = _query_part("q[1]", q[1], HEAD_DIM_QK - HEAD_DIM_V, "the RoPE half")
    if rope.dtype != latent.dtype:
        raise TypeError(f"q[1]: expected the dtype of q[0] ({latent.dtype}), got {rope.dtype}")
    if rope.shape[:3] != latent.shape[:3]:
        raise ValueError(f"q[1]: expected the batch, s_q and h_q of q[0] {tuple(latent.shape[:3])}, "
                         f"got {tuple(rope.shape[:3])}")
    if rope.device != latent.device:
        raise ValueError(f"q[1]: expected a tensor on {latent.device} (the device of q[0]), got {rope.device}")
    return latent, rope


def validate_decode_args(
    q: object,
    k_cache: object,
    block_table: object,
    cache_seqlens: object,
    head_dim_v: object,
    tile_scheduler_metadata: object,
    num_splits: object,
    softmax_scale: object,
    causal: object,
    out: object,
) -> DecodeShape:
    """Checks the arguments of ``flash_mla_with_kvcache`` and returns the call's sizes. ``q`` is
    one ``[b, s_q, h_q, 576]`` tensor or a (latent, rope) pair (``query_parts``)."""
    q, q_rope = query_parts(q)
    batch, s_q, h_q = q.shape[:3]
    if batch < 1 or s_q < 1 or h_q < 1:
        raise ValueError(f"q: expected batch, s_q and h_q >= 1, got shape {tuple(q.shape)}")

    k_cache = _tensor("k_cache", k_cache)
    if k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache: expected the dtype of q ({q.dtype}), got {k_cache.dtype}")
    _ndim("k_cache", k_cache, 4, "[num_pages, 64, h_k, 576]")
    num_pages, page_size, h_k, dk = k_cache.shape
    if page_size != PAGE_SIZE:
        raise ValueError(f"k_cache: expected {PAGE_SIZE}-token pages (dim 1), got {page_size}")
    if dk != HEAD_DIM_QK:
        raise ValueError(f"k_cache: expected head size {HEAD_DIM_QK}, got {dk}")
    if num_pages < 1 or h_k < 1:
        raise ValueError(f"k_cache: expected at least one page and one KV head, got shape {tuple(k_cache.shape)}")
    _same_device("k_cache", k_cache, q)
    _last_dim_contiguous("k_cache", k_cache)

    if h_q % h_k != 0:
        raise ValueError(f"q: h_q ({h_q}) must be a multiple of h_k ({h_k}, dim 2 of k_cache)")
    if h_q // h_k > MAX_HEADS_PER_KV_HEAD:
        raise ValueError(f"q: at most {MAX_HEADS_PER_KV_HEAD} query heads per KV head, got {h_q // h_k}")

    block_table = _tensor("block_table", block_table)
    _dtype("block_table", block_table, (torch.int32,))
    _ndim("block_table", block_table, 2, "[batch, max_pages_per_seq]")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table: expected {batch} rows (the batch of q), got {block_table.shape[0]}")
    _same_device("block_table", block_table, q)
    _last_dim_contiguous("block_table", block_table)

    seqlens = _tensor("cache_seqlens", cache_seqlens)
    _dtype("cache_seqlens", seqlens, (torch.int32,))
    _ndim("cache_seqlens", seqlens, 1, "[batch]")
    if seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens: expected {batch} entries (the batch of q), got {seqlens.shape[0]}")
    _same_device("cache_seqlens", seqlens, q)
    _last_dim_contiguous("cache_seqlens", seqlens)

    if _int_arg("head_dim_v", head_dim_v) != HEAD_DIM_V:
        raise ValueError(f"head_dim_v: expected {HEAD_DIM_V} (kv_lora_rank), got {head_dim_v}")

    md = _tensor("tile_scheduler_metadata", tile_scheduler_metadata)
    _dtype("tile_scheduler_metadata", md, (torch.int32,))
    if md.dim() != 2 or md.shape[1] != METADATA_FIELDS or md.shape[0] < 1:
        raise ValueError(
            f"tile_scheduler_metadata: expected [num_sm_parts, {METADATA_FIELDS}] from get_mla_metadata, "
            f"got shape {tuple(md.shape)}")
    if not md.is_contiguous():
        raise ValueError("tile_scheduler_metadata: expected a contiguous tensor from get_mla_metadata")
    _same_device("tile_scheduler_metadata", md, q)
    ns = _tensor("num_splits", num_splits)
    _dtype("num_splits", ns, (torch.int32,))
    if ns.dim() != 1 or ns.shape[0] != batch + 1:
        raise ValueError(f"num_splits: expected shape [{batch + 1}] (batch + 1) from get_mla_metadata, "
                         f"got {tuple(ns.shape)}")
    if not ns.is_contiguous():
        raise ValueError("num_splits: expected a contiguous tensor from get_mla_metadata")
    _same_device("num_splits", ns, q)

    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale) or softmax_scale <= 0:
            raise ValueError(f"softmax_scale: expected a finite value > 0, got {softmax_scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")

    if out is not None:
        out = _tensor("out", out)
        if out.dtype != q.dtype:
            raise TypeError(f"out: expected the dtype of q ({q.dtype}), got {out.dtype}")
        expected = (batch, s_q, h_q, HEAD_DIM_V)
        if tuple(out.shape) != expected:
            raise ValueError(f"out: expected shape {expected}, got {tuple(out.shape)}")
        if not out.is_contiguous():
            raise ValueError("out: expected a contiguous tensor")
        _same_device("out", out, q)

    if q.is_cuda:
        if q_rope is None:
            _raise_if(query_layout_problem("q", q))
        else:
            _raise_if(query_layout_problem("q[0]", q))
            _raise_if(query_layout_problem("q[1]", q_rope))
        _check_cache_layout(k_cache, block_table)
    return DecodeShape(batch, s_q, h_q, h_k, num_pages, block_table.shape[1])


def query_layout_problem(name: str, q: torch.Tensor) -> str | None:
    """What keeps the kernel's 16-byte loads from reading ``q`` (``[b, s_q, h_q, *]``, or one
    half of a pair) in place, or None: a strided last dim, a stride or base off 16 bytes."""
    problem = _last_dim_problem(name, q)
    if problem is not None:
        return problem
    elem = q.element_size()
    for dim, dim_name in ((0, "batch"), (1, "s_q"), (2, "h_q")):
        if q.shape[dim] > 1 and (q.stride(dim) * elem) % 16:
            return f"{name}: the {dim_name} stride ({q.stride(dim)} elements) must be a multiple of 16 bytes"
    if q.data_ptr() % 16:
        return f"{name}: the data pointer must be 16-byte aligned"
    return None


def _check_cache_layout(k_cache: torch.Tensor, block_table: torch.Tensor) -> None:
    """TMA-legal strides and alignment of k_cache; a block table with columns."""
    elem = k_cache.element_size()
    for dim, name in ((0, "page"), (1, "token"), (2, "head")):
        if (k_cache.stride(dim) * elem) % 16:
            raise ValueError(f"k_cache: the {name} stride ({k_cache.stride(dim)} elements) must be a multiple of 16 bytes")
    if k_cache.data_ptr() % 16:
        raise ValueError("k_cache: the data pointer must be 16-byte aligned")
    if block_table.shape[1] == 0:
        raise ValueError("block_table: expected at least one column")


_checked_contents: dict[tuple, bool] = {}


def contents_checks_enabled() -> bool:
    """``FLASHMLA_BACKEND_CHECK_CONTENTS=0`` turns off the content checks of GPU tensors."""
    return settings().check_contents


def validate_contents(block_table: torch.Tensor, cache_seqlens: torch.Tensor, shape: DecodeShape) -> None:
    """Checks that lengths are >= 0 and that every page a sequence uses exists in the table and
    the cache. On the GPU this syncs, so it runs once per contents version and never during
    CUDA-graph capture."""
    if cache_seqlens.is_cuda:
        if not contents_checks_enabled() or torch.cuda.is_current_stream_capturing():
            return
        key = (cache_seqlens.data_ptr(), cache_seqlens._version, block_table.data_ptr(),
               block_table._version, tuple(block_table.shape), shape.num_pages)
        if key in _checked_contents:
            return
    lengths = cache_seqlens.to("cpu", torch.int64)
    if bool((lengths < 0).any()):
        bad = int(torch.nonzero(lengths < 0)[0, 0])
        raise ValueError(f"cache_seqlens: lengths must be >= 0, got {int(lengths[bad])} at index {bad}")
    pages_needed = (lengths + PAGE_SIZE - 1) // PAGE_SIZE
    widest = int(pages_needed.max())
    if widest > shape.max_pages_per_seq:
        bad = int(torch.argmax(pages_needed))
        raise ValueError(
            f"block_table: sequence {bad} has {int(lengths[bad])} tokens = {widest} pages, but the table "
            f"has only {shape.max_pages_per_seq} columns")
    if widest > 0:
        cols = torch.arange(widest)
        used = cols[None, :] < pages_needed[:, None]  # [b, widest]
        ids = block_table[:, :widest].to("cpu", torch.int64)
        bad_ids = used & ((ids < 0) | (ids >= shape.num_pages))
        if bool(bad_ids.any()):
            row, col = (int(x) for x in torch.nonzero(bad_ids)[0])
            raise ValueError(
                f"block_table: page id {int(ids[row, col])} of sequence {row} (page {col}) is outside "
                f"k_cache's {shape.num_pages} pages")
    if cache_seqlens.is_cuda:
        if len(_checked_contents) > 4096:
            _checked_contents.clear()
        _checked_contents[key] = True
