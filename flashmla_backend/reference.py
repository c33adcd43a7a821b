"""Float32 reference for paged MLA decode: the executable spec of ``flash_mla_with_kvcache``.

It follows ``mla-contract.md``: V is the first 512 columns of each 576-wide cache row, heads
are grouped per KV head, causal masking is aligned to the bottom right, and an empty row gives
``out = 0`` and ``lse = +inf``. Cache slots past a sequence's end are never read, so NaN there
cannot leak. It runs on any device, slowly, and is what CPU tensors are computed with.
"""

from __future__ import annotations

import math

import torch

from ._constants import PAGE_SIZE


def mla_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int = 512,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference MLA decode.

    Args:
        q: ``[b, s_q, h_q, 576]`` bf16/fp16 (any float dtype works here).
        k_cache: ``[num_pages, 64, h_k, 576]``, same dtype as ``q``.
        block_table: ``[b, max_pages]`` int32 page ids.
        cache_seqlens: ``[b]`` int32 keys per sequence (may be 0).
        head_dim_v: width of V, the leading columns of each cache row (512).
        softmax_scale: defaults to ``576 ** -0.5``.
        causal: bottom-right aligned mask; only matters for ``s_q > 1``.

    Returns:
        ``out [b, s_q, h_q, head_dim_v]`` in ``q.dtype`` and ``lse [b, h_q, s_q]`` float32
        (natural log of the sum of exp of the scaled scores; +inf for empty rows).
    """
    b, s_q, h_q, d = q.shape
    h_k = k_cache.shape[2]
    group = h_q // h_k
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float32, device=q.device)
    lengths = cache_seqlens.tolist()
    for i, length in enumerate(lengths):
        if length <= 0:
            continue
        num_pages = -(-length // PAGE_SIZE)
        pages = block_table[i, :num_pages].long()
        keys = k_cache[pages].reshape(num_pages * PAGE_SIZE, h_k, d)[:length].float()  # [L, h_k, d]
        keys = keys.permute(1, 0, 2)  # [h_k, L, d]
        queries = q[i].float().reshape(s_q, h_k, group, d).permute(1, 0, 2, 3)  # [h_k, s_q, G, d]
        scores = torch.einsum("ksgd,kld->ksgl", queries, keys) * scale  # [h_k, s_q, G, L]
        if causal:
            limits = length - (s_q - 1 - torch.arange(s_q, device=q.device))  # [s_q]
            masked = torch.arange(length, device=q.device)[None, :] >= limits[:, None]  # [s_q, L]
            scores = scores.masked_fill(masked[None, :, None, :], -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)  # [h_k, s_q, G]
        probs = torch.exp(scores - row_lse[..., None])
        probs = torch.nan_to_num(probs, nan=0.0)  # rows where every key is masked
        values = keys[..., :head_dim_v]  # [h_k, L, dv]
        o = torch.einsum("ksgl,kld->ksgd", probs, values)  # [h_k, s_q, G, dv]
        out[i] = o.permute(1, 0, 2, 3).reshape(s_q, h_q, head_dim_v)
        row_lse = torch.where(torch.isfinite(row_lse), row_lse, torch.full_like(row_lse, math.inf))
        lse[i] = row_lse.permute(0, 2, 1).reshape(h_q, s_q)
    return out.to(q.dtype), lse

