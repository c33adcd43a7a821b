"""The decode built with ``-DFUSED_COMBINE=1`` merges split requests itself (no combine kernel).

Split-heavy problems (one long request over every SM, small batches at 128 heads, varlen with
empty requests, two KV heads, ``s_q > 1``) against the float32 reference, repeated calls and a
CUDA-graph replay: the per-request counters must come back to zero after every call, or the next
call would merge too early (wrong output) or wait for arrivals that never come.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_lse_close, relative_error, requires_hopper
from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata, mla_decode_reference
from flashmla_backend.testing import capture_decode_step, make_problem

pytestmark = requires_hopper


@pytest.fixture(autouse=True)
def fused_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_DEFINES", "-DFUSED_COMBINE=1")


def _counters_are_zero() -> bool:
    from flashmla_backend import api

    return int(api._split_counters(torch.device("cuda"), 0).abs().sum()) == 0


def _check(lengths: list[int], s_q: int, h_q: int, h_k: int = 1, seed: int = 0, calls: int = 1) -> None:
    p = make_problem(lengths, s_q, h_q, h_k, causal=True, seed=seed)
    md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
    splits = (ns[1:] - ns[:-1]).max().item()
    ref, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, causal=True)
    for call in range(calls):
        out = torch.full((len(lengths), s_q, h_q, 512), float("nan"), dtype=p.q.dtype, device="cuda")
        got, lse = flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns,
                                          causal=True, out=out)
        torch.cuda.synchronize()
        assert relative_error(got, ref.float()) < 1e-2, f"call {call}, {splits} splits at most"
        assert_lse_close(lse, ref_lse)
        assert _counters_are_zero(), f"split counters left set after call {call}"


def test_contract_takes_the_counters() -> None:
    from flashmla_backend.kernel_sources import decode_launch_contract, decode_module

    assert decode_launch_contract(decode_module(torch.bfloat16, True)).combines_splits


@pytest.mark.parametrize("lengths,s_q,h_q,h_k", [
    ([8192], 1, 16, 1),                     # b = 1: one request over every part
    ([60000], 2, 16, 1),                    # a split per part (132 on an H100/H200): several LSEs a lane
    ([2048] * 8, 1, 128, 1),                # b = 8 latency row: two query blocks per request
    ([3000, 0, 17, 9000, 0, 64, 4096], 2, 64, 1),  # varlen with empty requests, s_q = 2
    ([5000, 1200, 7], 1, 33, 1),            # odd head count: a partly valid query block
    ([6000, 2500], 2, 32, 2),               # two KV heads
])
def test_split_heavy_problems(lengths: list[int], s_q: int, h_q: int, h_k: int) -> None:
    _check(lengths, s_q, h_q, h_k, calls=3)


def test_cuda_graph_replay_with_new_lengths() -> None:
    batch, s_q, h_q = 4, 1, 16
    base = make_problem([9000] * batch, s_q, h_q, causal=True, seed=3)
    seqlens = base.cache_seqlens.clone()
    graph, out, lse = capture_decode_step(base.q, base.k_cache, base.block_table, seqlens)
    gen = torch.Generator().manual_seed(8)
    for step in range(6):
        seqlens.copy_(torch.randint(0, 9001, (batch,), generator=gen, dtype=torch.int32))
        graph.replay()
        ref, ref_lse = mla_decode_reference(base.q, base.k_cache, base.block_table, seqlens, 512, causal=True)
        torch.cuda.synchronize()
        assert relative_error(out, ref.float()) < 1e-2, f"replay {step}"
        assert_lse_close(lse, ref_lse)
        assert _counters_are_zero(), f"split counters left set after replay {step}"
