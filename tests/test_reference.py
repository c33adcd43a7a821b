"""The float32 reference against a naive per-(request, token, head) loop."""

from __future__ import annotations

import math

import pytest
import torch

from flashmla_backend import mla_decode_reference
from flashmla_backend.testing import make_problem


def naive_decode(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                 seqlens: torch.Tensor, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One query row at a time, keys gathered token by token through the block table."""
    b, s_q, h_q, _ = q.shape
    h_k = k_cache.shape[2]
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        n = int(seqlens[i])
        for s in range(s_q):
            visible = n - (s_q - 1 - s) if causal else n
            if visible <= 0:
                continue
            for h in range(h_q):
                kh = h // (h_q // h_k)
                keys = torch.stack([k_cache[int(block_table[i, t // 64]), t % 64, kh].double()
                                    for t in range(visible)])
                scores = keys @ q[i, s, h].double() * scale
                m = scores.max()
                w = torch.exp(scores - m)
                out[i, s, h] = (w[:, None] * keys[:, :512]).sum(0) / w.sum()
                lse[i, h, s] = m + torch.log(w.sum())
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s_q,h_q,h_k", [(1, 3, 1), (2, 4, 2), (3, 2, 1)])
def test_reference_matches_naive_loop(causal: bool, s_q: int, h_q: int, h_k: int) -> None:
    p = make_problem([0, 1, 70, 130, 2], s_q, h_q, h_k, dtype=torch.bfloat16, device="cpu",
                     causal=causal, seed=s_q * 10 + h_q)
    scale = 0.1 + 0.01 * h_q
    out, lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, scale, causal)
    ref_out, ref_lse = naive_decode(p.q, p.k_cache, p.block_table, p.cache_seqlens, scale, causal)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert not bool(torch.isnan(out).any()), "NaN from unused cache slots leaked"
    torch.testing.assert_close(out.double(), ref_out, atol=1e-2, rtol=1e-2)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-4, rtol=1e-5)


def test_empty_rows_give_zero_and_inf() -> None:
    p = make_problem([0, 3], 4, 2, device="cpu", causal=True, seed=1)
    out, lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, causal=True)
    assert bool((out[0] == 0).all()) and bool(torch.isinf(lse[0]).all())
    # s_k = 3 < s_q = 4: the first query token sees no key.
    assert bool((out[1, 0] == 0).all()) and bool(torch.isinf(lse[1, :, 0]).all())
    assert bool(torch.isfinite(lse[1, :, 1:]).all())


def test_default_scale_is_576_inverse_sqrt() -> None:
    p = make_problem([100], 1, 2, device="cpu", seed=2)
    a, _ = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens)
    b, _ = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, softmax_scale=576 ** -0.5)
    assert torch.equal(a, b)
