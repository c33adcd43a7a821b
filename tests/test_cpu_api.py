"""The public API on CPU tensors: the same results as the reference, FlashMLA's return shapes."""

from __future__ import annotations

import torch

import flashmla_backend
from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata, mla_decode_reference
from flashmla_backend.testing import make_problem


def test_cpu_call_matches_reference_and_shapes() -> None:
    p = make_problem([5, 0, 200], 2, 8, 2, dtype=torch.float16, device="cpu", causal=True, seed=3)
    md, ns = get_mla_metadata(p.cache_seqlens, 2 * 8 // 2, 2)
    assert md.dtype == torch.int32 and md.shape[1] == 8
    assert ns.dtype == torch.int32 and ns.shape == (4,)
    out, lse = flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns, causal=True)
    assert out.shape == (3, 2, 8, 512) and out.dtype == torch.float16
    assert lse.shape == (3, 8, 2) and lse.dtype == torch.float32
    ref, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, causal=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


def test_cpu_call_writes_into_out() -> None:
    p = make_problem([64, 65], 1, 4, device="cpu", seed=4)
    md, ns = get_mla_metadata(p.cache_seqlens, 4, 1)
    buf = torch.full((2, 1, 4, 512), float("nan"), dtype=torch.bfloat16)
    out, _ = flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns, out=buf)
    assert out is buf and not bool(torch.isnan(buf).any())


def test_public_names() -> None:
    for name in ("get_mla_metadata", "flash_mla_with_kvcache", "precompile", "mla_decode_reference"):
        assert callable(getattr(flashmla_backend, name))
