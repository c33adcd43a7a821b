"""Reliability on the GPU: 1000 CUDA-graph replays with changing lengths, and long contexts."""

from __future__ import annotations

import torch

from conftest import assert_lse_close, relative_error, requires_hopper
from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata, mla_decode_reference, precompile
from flashmla_backend.testing import make_problem

pytestmark = requires_hopper

REPLAYS = 1000
SPOT_CHECK_EVERY = 50


def test_thousand_graph_replays_with_changing_lengths() -> None:
    precompile()
    batch, s_q, h_q, max_len = 16, 2, 16, 2500
    base = make_problem([max_len] * batch, s_q, h_q, causal=True, seed=31)
    seqlens = base.cache_seqlens.clone()
    q = base.q.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: workspaces, tensor maps
        md, ns = get_mla_metadata(seqlens, s_q * h_q, 1)
        flash_mla_with_kvcache(q, base.k_cache, base.block_table, seqlens, 512, md, ns, causal=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        md, ns = get_mla_metadata(seqlens, s_q * h_q, 1)
        out, lse = flash_mla_with_kvcache(q, base.k_cache, base.block_table, seqlens, 512, md, ns, causal=True)
    gen = torch.Generator(device="cuda").manual_seed(7)
    checked = 0
    for step in range(REPLAYS):
        # New lengths and queries on the device, as a decode loop would write them.
        seqlens.copy_(torch.randint(0, max_len + 1, (batch,), device="cuda", generator=gen, dtype=torch.int32))
        q.normal_(generator=gen)
        graph.replay()
        if step % SPOT_CHECK_EVERY == 0 or step == REPLAYS - 1:
            ref, ref_lse = mla_decode_reference(q, base.k_cache, base.block_table, seqlens, 512, causal=True)
            assert relative_error(out, ref.float()) < 1e-2, f"replay {step}"
            assert_lse_close(lse, ref_lse)
            checked += 1
    torch.cuda.synchronize()
    assert checked == REPLAYS // SPOT_CHECK_EVERY + 1


def test_single_128k_request() -> None:
    p = make_problem([131072], 1, 16, causal=True, seed=41)
    md, ns = get_mla_metadata(p.cache_seqlens, 16, 1)
    out, lse = flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns, causal=True)
    ref, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, causal=True)
    assert int(ns[-1]) > 1, "a 128k request should be split across SMs"
    assert relative_error(out, ref.float()) < 1e-2
    assert_lse_close(lse, ref_lse)


def test_batch_mixing_one_and_64k_tokens() -> None:
    lengths = [1, 65536, 1, 1, 65536, 7, 1]
    p = make_problem(lengths, 2, 128, causal=True, seed=43)
    md, ns = get_mla_metadata(p.cache_seqlens, 2 * 128, 1)
    out, lse = flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns, causal=True)
    ref, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, causal=True)
    assert relative_error(out, ref.float()) < 1e-2
    assert_lse_close(lse, ref_lse)
