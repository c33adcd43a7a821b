"""Cache blocks of ``k * 64`` tokens seen as ``k`` kernel pages of 64 tokens. Pure torch.

What vLLM 0.26 hands the backend: the backend declares kernel block size 64, and when the
cache manager's block is larger (``--block-size 128`` or ``256``) vLLM already splits it. Both
model runners write kernel block ids into the block table (``BlockTable.map_to_kernel_blocks``
in ``vllm/v1/worker/block_table.py``; ``append_block_ids`` in ``vllm/v1/worker/gpu/block_table.py``),
the metadata builder gets a ``kv_cache_spec`` whose ``block_size`` is the kernel block size
(``AttentionGroup.create_metadata_builders``), and the cache tensor is shaped with 64-token
blocks (``_reshape_kv_cache_tensors``). So on that path ``pages_per_block`` is 1 and the
functions below are the identity.

They do the mapping for a caller that gives blocks of ``k * 64`` tokens: block ``b`` holds
kernel pages ``b * k + j`` for ``j < k``, which are consecutive 64-token slices of the block
when the cache is viewed as ``[num_blocks * k, 64, ...]``. Nothing here reads tensor contents
on the host, so it runs on the GPU without a sync and inside CUDA-graph capture.
"""

from __future__ import annotations

import torch

from .capabilities import KERNEL_BLOCK_SIZE


def kernel_pages_per_block(block_size: int, page_size: int = KERNEL_BLOCK_SIZE) -> int:
    """How many ``page_size``-token kernel pages one ``block_size``-token cache block holds.

    Raises ``ValueError`` unless ``block_size`` is a positive multiple of ``page_size``.
    """
    if block_size <= 0 or block_size % page_size != 0:
        raise ValueError(
            f"flashmla_backend needs cache blocks of a multiple of {page_size} tokens, got {block_size}")
    return block_size // page_size


def expand_block_table(block_table: torch.Tensor, pages_per_block: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Block ids of ``pages_per_block * 64``-token blocks to 64-token kernel page ids.

    Args:
        block_table: ``[batch, max_blocks]`` int32 cache block ids; entries past a sequence's
            end may hold anything (they map to ids that are never read).
        pages_per_block: ``k``, kernel pages per cache block.
        out: optional contiguous int32 ``[batch, max_blocks * k]`` destination (a slice of a
            persistent buffer, so the result keeps a fixed address across CUDA-graph replays).

    Returns:
        ``[batch, max_blocks * k]`` int32 where column ``i * k + j`` is ``block_table[:, i] * k + j``.
        With ``k == 1`` and no ``out``, ``block_table`` itself.
    """
    if block_table.dim() != 2:
        raise ValueError(f"block_table: expected [batch, max_blocks], got shape {tuple(block_table.shape)}")
    if pages_per_block < 1:
        raise ValueError(f"pages_per_block: expected >= 1, got {pages_per_block}")
    batch, max_blocks = block_table.shape
    if pages_per_block == 1:
        if out is None:
            return block_table
        return out.copy_(block_table)
    shape = (batch, max_blocks * pages_per_block)
    if out is None:
        out = torch.empty(shape, dtype=block_table.dtype, device=block_table.device)
    elif tuple(out.shape) != shape or not out.is_contiguous() or out.dtype != block_table.dtype:
        raise ValueError(f"out: expected a contiguous {block_table.dtype} tensor of shape {shape}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    offsets = torch.arange(pages_per_block, dtype=block_table.dtype, device=block_table.device)
    # out[b, i, j] = offsets[j] + k * block_table[b, i], in one broadcast kernel.
    torch.add(offsets, block_table.unsqueeze(-1), alpha=pages_per_block,
              out=out.view(batch, max_blocks, pages_per_block))
    return out


def split_cache_blocks(kv_cache: torch.Tensor, page_size: int = KERNEL_BLOCK_SIZE) -> torch.Tensor:
    """View a cache of ``k * page_size``-token blocks as ``k``-times more ``page_size``-token pages.

    Args:
        kv_cache: ``[num_blocks, block_size, ...]`` (vLLM's MLA cache is ``[num_blocks, block_size, 576]``).
        page_size: tokens per kernel page.

    Returns:
        A view ``[num_blocks * k, page_size, ...]`` sharing storage with ``kv_cache``, where page
        ``b * k + j`` is tokens ``[j * page_size, (j + 1) * page_size)`` of block ``b``; the
        input itself when ``block_size == page_size``. Raises ``ValueError`` when a block's
        tokens are not laid out back to back (no view exists then, and a copy would be wrong).
    """
    if kv_cache.dim() < 2:
        raise ValueError(f"kv_cache: expected [num_blocks, block_size, ...], got shape {tuple(kv_cache.shape)}")
    num_blocks, block_size = kv_cache.shape[0], kv_cache.shape[1]
    pages = kernel_pages_per_block(block_size, page_size)
    if pages == 1:
        return kv_cache
    if kv_cache.stride(0) != block_size * kv_cache.stride(1):
        raise ValueError(
            f"kv_cache: blocks of {block_size} tokens with strides {kv_cache.stride()} cannot be viewed "
            f"as {page_size}-token pages (the block stride must be {block_size} token strides)")
    return kv_cache.view(num_blocks * pages, page_size, *kv_cache.shape[2:])
