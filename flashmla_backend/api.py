"""The FlashMLA-compatible public API: ``get_mla_metadata`` and ``flash_mla_with_kvcache``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._constants import (
    BLOCK_M,
    COMBINE_MAX_REQUESTS_PER_CTA,
    COMBINE_WARPS,
    DECODE_SMEM_BYTES,
    DECODE_THREADS,
    DEFAULT_NUM_SMS,
    HEAD_DIM_QK,
    HEAD_DIM_V,
    MAX_BATCH,
    SCHEDULE_THREADS,
    SMALL_SCHEDULE_MAX_BATCH,
    SMALL_SCHEDULE_THREADS,
)
from .kernel_sources import (
    COMBINE_SIGNATURE,
    SCHEDULE_MODULE,
    SCHEDULE_SIGNATURE,
    DecodeLaunchContract,
    KernelModule,
    combine_module,
    decode_launch_contract,
    decode_module,
    decode_signature,
    few_rows_decode_module,
)
from .kv_producer import load_by_cp_async
from .reference import mla_decode_reference
from .launch import KernelSignature, launch_kernel, resident_ctas_per_sm
from .runtime import check_device, get_kernel, sm_count
from .schedule import no_split_slack, num_sm_parts, schedule_reference, split_overhead_pages, whole_requests
from .settings import Settings, settings
from .tensor_map import kv_cache_tensor_map
from .validation import validate_contents, validate_decode_args, validate_metadata_args

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class _Decode:
    """A loaded decode version: its ``CUfunction``, launch contract and parameter signature."""

    function: int
    contract: DecodeLaunchContract
    signature: KernelSignature


@dataclass(frozen=True)
class _CallKernels:
    """The loaded decode(s) and combine of one (GPU, dtype) under one set of settings."""

    settings: Settings
    decode: _Decode
    few_rows: _Decode | None  # FLASHMLA_BACKEND_FEW_ROWS_DECODE_FILE's version, for its shapes
    combine: int  # CUfunction handle
    combine_resident_ctas: int  # combine CTAs the whole GPU holds at once

    def decode_for(self, rows: int) -> _Decode:
        """The decode for ``rows`` query rows per KV head: the few-rows version where it takes
        them, else the main one; ValueError (naming q) if that one takes fewer rows."""
        few = self.few_rows
        if few is not None and rows <= few.contract.max_query_rows:
            return few
        limit = self.decode.contract.max_query_rows
        if limit is not None and rows > limit:
            raise ValueError(f"q: {rows} query rows per KV head (s_q * h_q / h_k), but the decode version "
                             f"{self.settings.decode_file} takes at most {limit}")
        return self.decode


def _load_decode(module: KernelModule, index: int) -> _Decode:
    contract = decode_launch_contract(module)
    return _Decode(get_kernel(module, "mla_decode", index), contract, decode_signature(contract))


_call_kernels_cache: dict[tuple[int, torch.dtype], _CallKernels] = {}


def _call_kernels(index: int, dtype: torch.dtype) -> _CallKernels:
    """Resolved once per (GPU, dtype) and settings: the per-call path then builds no module keys."""
    current = settings()
    cached = _call_kernels_cache.get((index, dtype))
    if cached is not None and cached.settings is current:
        return cached
    programmatic = current.programmatic_launch
    few_rows_module = few_rows_decode_module(dtype, programmatic)
    few_rows = _load_decode(few_rows_module, index) if few_rows_module is not None else None
    combine = combine_module(dtype, programmatic)
    combine_kernel = get_kernel(combine, "mla_combine", index)
    resident = resident_ctas_per_sm(combine_kernel, COMBINE_WARPS * 32, index) * sm_count(index)
    cached = _CallKernels(current, _load_decode(decode_module(dtype, programmatic), index), few_rows,
                          combine_kernel, max(1, resident))
    _call_kernels_cache[(index, dtype)] = cached
    return cached


def _unsupported_flags(is_fp8_kvcache: object, extra: object, extra_name: str) -> None:
    if is_fp8_kvcache:
        raise ValueError("is_fp8_kvcache: an fp8 KV cache is not supported; use a bf16 or fp16 cache")
    if extra is not None:
        raise ValueError(f"{extra_name}: sparse attention is not supported; pass None")


def get_mla_metadata(
    cache_seqlens: torch.Tensor,
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
    topk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Splits the batch's KV pages evenly across the GPU's SMs, or gives each request an SM of its
    own where that costs at most one split's overhead more (``schedule.whole_requests``).

    Args:
        cache_seqlens: ``[b]`` int32, keys per sequence.
        num_q_tokens_per_head_k: ``s_q * h_q // h_k``.
        num_heads_k: ``h_k`` (1 for MLA).
        num_heads_q, is_fp8_kvcache, topk: accepted for FlashMLA compatibility; fp8 and
            sparse (``topk``) are not supported.

    Returns:
        ``tile_scheduler_metadata`` int32 ``[num_sm_parts, 8]`` and ``num_splits`` int32
        ``[b + 1]``. On a GPU both are computed by a kernel on torch's current stream: no host
        sync, capturable in a CUDA graph. Reuse them for every layer of a decode step.
    """
    validate_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
    _unsupported_flags(is_fp8_kvcache, topk, "topk")
    batch = cache_seqlens.shape[0]
    if batch > MAX_BATCH:
        raise ValueError(f"cache_seqlens: at most {MAX_BATCH} sequences per batch, got {batch}")
    if not cache_seqlens.is_cuda:
        parts = num_sm_parts(DEFAULT_NUM_SMS, num_q_tokens_per_head_k, num_heads_k)
        return schedule_reference(cache_seqlens, parts)

    index = check_device(cache_seqlens.device)
    parts = num_sm_parts(sm_count(index), num_q_tokens_per_head_k, num_heads_k)
    metadata = torch.empty((parts, 8), dtype=torch.int32, device=cache_seqlens.device)
    num_splits = torch.empty((batch + 1,), dtype=torch.int32, device=cache_seqlens.device)
    args = (cache_seqlens.data_ptr(), batch, parts, split_overhead_pages(), no_split_slack(),
            int(whole_requests()), metadata.data_ptr(), num_splits.data_ptr())
    if batch <= SMALL_SCHEDULE_MAX_BATCH and settings().small_schedule:
        # One warp holds the whole batch: no shared memory, no CTA barrier (the latency rows).
        launch_kernel(get_kernel(SCHEDULE_MODULE, "mla_schedule_small", index), SCHEDULE_SIGNATURE, (1, 1, 1),
                      SMALL_SCHEDULE_THREADS, args, index)
    else:
        launch_kernel(get_kernel(SCHEDULE_MODULE, "mla_schedule", index), SCHEDULE_SIGNATURE, (1, 1, 1),
                      SCHEDULE_THREADS, args, index, shared_mem=4 * (batch + 1))
    return metadata, num_splits


def _combine_warps_per_row(batch: int, parts: int) -> int:
    """Warps merging one output row: a request has about ``parts / batch`` splits, so small
    batches get up to 8 warps per row and large ones 1."""
    splits_per_request = parts / batch
    for warps in (8, 4, 2):
        if splits_per_request >= 4 * warps:
            return warps
    return 1


def _combine_requests_per_cta(batch: int, column_ctas: int, resident_ctas: int, forced: int) -> int:
    """Requests one combine CTA serves: ``forced`` when the setting names a count, else the
    fewest that keep the grid (``column_ctas`` CTAs per request) within one wave of resident CTAs.
    The grid drains after the decode even where nothing is split (1-3 µs for 1-4 waves on an
    H100, NOTES.md run 26), while beyond one wave more CTAs add no merge parallelism."""
    if forced:
        return forced
    return min(COMBINE_MAX_REQUESTS_PER_CTA, max(1, -(-column_ctas * batch // resident_ctas)))


_workspaces: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
# Replaced workspaces stay alive: a CUDA graph captured with one keeps writing to its address.
_retired_workspaces: list[tuple[torch.Tensor, torch.Tensor]] = []


def _split_workspace(device: torch.device, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 partial outputs ``[rows, 512]`` and partial LSEs ``[rows]``, grown on demand and
    reused, so a steady decode loop allocates nothing."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cached = _workspaces.get(index)
    if cached is None or cached[1].numel() < rows:
        if cached is not None:
            _retired_workspaces.append(cached)
            rows = max(rows, 2 * cached[1].numel())  # geometric growth: few retired buffers
        cached = (torch.empty((rows, HEAD_DIM_V), dtype=torch.float32, device=device),
                  torch.empty((rows,), dtype=torch.float32, device=device))
        _workspaces[index] = cached
    return cached


def split_workspace_rows(batch: int, num_q_tokens_per_head_k: int, num_heads_k: int, num_sms: int) -> int:
    """Rows of float32 partial output a call needs: one per (split, KV head, query row), with at
    most ``batch + num_sm_parts`` splits."""
    parts = num_sm_parts(num_sms, num_q_tokens_per_head_k, num_heads_k)
    return (batch + parts) * num_heads_k * num_q_tokens_per_head_k


def reserve_workspace(device: torch.device | int, max_batch: int, num_q_tokens_per_head_k: int,
                      num_heads_k: int = 1) -> None:
    """Allocates the split workspace for batches up to ``max_batch`` now, e.g. before CUDA-graph
    capture, so that no later call has to grow it. Workspaces are never freed while the process
    runs, so graphs captured earlier stay valid."""
    device = torch.device("cuda", device) if isinstance(device, int) else device
    index = check_device(device)
    rows = split_workspace_rows(max_batch, num_q_tokens_per_head_k, num_heads_k, sm_count(index))
    _split_workspace(torch.device("cuda", index), rows)


def flash_mla_with_kvcache(
    q: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    check_contents: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decode attention, FlashMLA semantics (see ``mla-contract.md``).

    Args:
        q: ``[b, s_q, h_q, 576]`` bf16 or fp16; last dim contiguous. Or, beyond FlashMLA's API,
            a pair ``(q_latent [b, s_q, h_q, 512], q_rope [b, s_q, h_q, 64])`` of one dtype, each
            with its own strides: the kernel reads both in place, so a caller that holds the
            two halves apart (vLLM's MLA layer) needs no concatenation.
        k_cache: ``[num_pages, 64, h_k, 576]``, dtype of ``q``; V is its first 512 columns.
        block_table: ``[b, max_pages_per_seq]`` int32 page ids; entries past a sequence's
            end are never read.
        cache_seqlens: ``[b]`` int32 keys per sequence (0 allowed).
        head_dim_v: must be 512.
        tile_scheduler_metadata, num_splits: from ``get_mla_metadata``.
        softmax_scale: defaults to ``576 ** -0.5``.
        causal: bottom-right aligned causal mask for ``s_q > 1`` (MTP / speculative decode).
        is_fp8_kvcache, indices: FlashMLA arguments for fp8 and sparse attention; unsupported.
        out: optional contiguous ``[b, s_q, h_q, 512]`` output buffer.
        check_contents: run the content checks (lengths, page ids; see ``validation.py``).
            Callers that build the tables themselves, like the vLLM backend, pass False to
            keep the GPU path free of host syncs.

    Returns:
        ``out [b, s_q, h_q, 512]`` (dtype of ``q``) and ``lse [b, h_q, s_q]`` float32.
        CPU tensors are computed by the float32 reference.
    """
    _unsupported_flags(is_fp8_kvcache, indices, "indices")
    shape = validate_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                 tile_scheduler_metadata, num_splits, softmax_scale, causal, out)
    q, q_rope = (q, None) if isinstance(q, torch.Tensor) else q  # validated: a tensor or a pair
    sms = sm_count(check_device(q.device)) if q.is_cuda else DEFAULT_NUM_SMS
    expected_parts = num_sm_parts(sms, shape.rows, shape.h_k)
    if tile_scheduler_metadata.shape[0] != expected_parts:
        raise ValueError(
            f"tile_scheduler_metadata: {tile_scheduler_metadata.shape[0]} parts, but this call needs "
            f"{expected_parts}; compute it with get_mla_metadata(cache_seqlens, {shape.rows}, {shape.h_k}) "
            f"for these shapes")
    if check_contents:
        validate_contents(block_table, cache_seqlens, shape)
    scale = float(softmax_scale) if softmax_scale is not None else HEAD_DIM_QK ** -0.5

    if not q.is_cuda:
        q_full = q if q_rope is None else torch.cat((q, q_rope), dim=-1)
        ref_out, lse = mla_decode_reference(q_full, k_cache, block_table, cache_seqlens, HEAD_DIM_V,
                                            scale, causal)
        if out is None:
            return ref_out, lse
        out.copy_(ref_out)
        return out, lse

    index = check_device(q.device)
    rows = shape.rows
    m_blocks = -(-rows // BLOCK_M)
    parts = tile_scheduler_metadata.shape[0]
    o_part, lse_part = _split_workspace(q.device, split_workspace_rows(shape.batch, rows, shape.h_k, sms))
    if out is None:
        out = torch.empty((shape.batch, shape.s_q, shape.h_q, HEAD_DIM_V), dtype=q.dtype, device=q.device)
    lse = torch.empty((shape.batch, shape.h_q, shape.s_q), dtype=torch.float32, device=q.device)

    kernels = _call_kernels(index, q.dtype)
    decode = kernels.decode_for(rows)
    contract = decode.contract
    if q_rope is not None and not contract.takes_q_rope_pointer:
        q, q_rope = torch.cat((q, q_rope), dim=-1), None  # a decode version without the RoPE pointer
    q_strides = q.stride()
    args = (kv_cache_tensor_map(k_cache, contract.tma_box_tokens), q.data_ptr(), q_strides[0], q_strides[1],
            q_strides[2], block_table.data_ptr(), block_table.stride(0),
            cache_seqlens.data_ptr(), tile_scheduler_metadata.data_ptr(), num_splits.data_ptr(),
            out.data_ptr(), lse.data_ptr(), o_part.data_ptr(), lse_part.data_ptr(),
            shape.s_q, shape.h_q, shape.h_k, int(causal), scale * _LOG2E, int(m_blocks == 1))
    if contract.takes_kv_pointer:
        args += (k_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1))
    if contract.selects_kv_producer:
        args += (int(load_by_cp_async(index, m_blocks)),)
    if contract.takes_q_rope_pointer:
        if q_rope is None:  # one [.., 576] tensor: its RoPE columns follow the 512 latent ones
            args += (q.data_ptr() + HEAD_DIM_V * q.element_size(), q_strides[0], q_strides[1], q_strides[2])
        else:
            rope_strides = q_rope.stride()
            args += (q_rope.data_ptr(), rope_strides[0], rope_strides[1], rope_strides[2])
    launch_kernel(decode.function, decode.signature, (m_blocks, shape.h_k, parts), DECODE_THREADS, args,
                  index, shared_mem=DECODE_SMEM_BYTES, programmatic=kernels.settings.programmatic_launch)
    warps_per_row = _combine_warps_per_row(shape.batch, parts)
    rows_per_cta = COMBINE_WARPS // warps_per_row
    column_ctas = -(-shape.h_k * rows // rows_per_cta)
    requests_per_cta = _combine_requests_per_cta(shape.batch, column_ctas, kernels.combine_resident_ctas,
                                                 kernels.settings.combine_requests_per_cta)
    launch_kernel(kernels.combine, COMBINE_SIGNATURE, (column_ctas, -(-shape.batch // requests_per_cta), 1),
                  COMBINE_WARPS * 32, (o_part.data_ptr(), lse_part.data_ptr(), num_splits.data_ptr(), out.data_ptr(),
                                       lse.data_ptr(), shape.s_q, shape.h_q, shape.h_k, warps_per_row, shape.batch),
                  index, programmatic=kernels.settings.programmatic_launch)
    return out, lse


__all__ = ["get_mla_metadata", "flash_mla_with_kvcache", "reserve_workspace", "MAX_BATCH"]
