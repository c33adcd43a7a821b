"""q as a (latent, rope) pair: the decode reads both halves in place, each with its own strides.

vLLM's MLA layer produces the query in two tensors: the latent half ``[T, H, 512]`` as a
transposed view of the W_UK product's ``[H, T, 512]`` buffer, and the RoPE half ``[T, H, 64]``
as a view into the ``[T, H, 192]`` query projection. ``flash_mla_with_kvcache`` takes that pair
as it is, so the backend needs no concatenation kernel per layer. The pair must give what the
concatenated tensor gives: the same values on the CPU reference, the same bits on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_lse_close, relative_error, requires_hopper
from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata, mla_decode_reference
from flashmla_backend.testing import DecodeProblem, draw_lengths, make_problem

NOPE_COLUMNS = 128  # DeepSeek's qk_nope_head_dim: the projection's columns before the RoPE ones


def vllm_query_halves(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [b, s_q, h_q, 576]`` laid out as vLLM hands it over: the latent half a view of a
    head-major ``[h_q, b * s_q, 512]`` buffer, the RoPE half a view into a ``[b * s_q, h_q, 192]``
    projection whose other 128 columns hold NaN (read by mistake, they would poison the output)."""
    b, s_q, h_q, _ = q.shape
    tokens = q.reshape(b * s_q, h_q, 576)
    latent = tokens[..., :512].transpose(0, 1).contiguous().transpose(0, 1)
    projection = torch.full((b * s_q, h_q, NOPE_COLUMNS + 64), float("nan"), dtype=q.dtype, device=q.device)
    projection[..., NOPE_COLUMNS:] = tokens[..., 512:]
    rope = projection[..., NOPE_COLUMNS:]
    return latent.reshape(b, s_q, h_q, 512), rope.reshape(b, s_q, h_q, 64)


def separate_halves(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each half in a buffer of its own (what the CUDA-graph test of the backend feeds)."""
    return q[..., :512].clone(), q[..., 512:].clone()


def call(p: DecodeProblem, q: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    b, s_q, h_q, h_k = p.shape
    md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
    out = torch.full((b, s_q, h_q, 512), float("nan"), dtype=p.q.dtype, device=p.q.device)
    return flash_mla_with_kvcache(q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns,
                                  causal=p.causal, out=out)


def test_views_are_what_vllm_passes() -> None:
    # The helper must build the strided views it claims to, or the GPU tests prove little.
    q = torch.randn(3, 2, 16, 576, dtype=torch.bfloat16)
    latent, rope = vllm_query_halves(q)
    assert latent.stride() == (2 * 512, 512, 3 * 2 * 512, 1)
    assert rope.stride() == (2 * 16 * 192, 16 * 192, 192, 1)
    assert torch.equal(torch.cat((latent, rope), -1), q)


@pytest.mark.parametrize("halves", [vllm_query_halves, separate_halves])
def test_pair_matches_one_tensor_on_the_cpu_reference(halves) -> None:
    p = make_problem([70, 0, 130, 1], 2, 16, 1, device="cpu", seed=11)
    want_out, want_lse = call(p, p.q)
    got_out, got_lse = call(p, halves(p.q))
    assert torch.equal(got_out, want_out)
    assert torch.equal(got_lse, want_lse)


@requires_hopper
@pytest.mark.parametrize("halves", [vllm_query_halves, separate_halves])
@pytest.mark.parametrize("h_q,s_q", [(16, 1), (16, 2), (128, 1), (128, 2), (3, 4)])
@pytest.mark.parametrize("producer", ["", "tma", "cp_async"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pair_gives_the_bits_of_one_tensor(halves, h_q: int, s_q: int, producer: str, dtype: torch.dtype,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHMLA_BACKEND_KV_PRODUCER", producer)
    gen = torch.Generator().manual_seed(h_q * 5 + s_q)
    lengths = draw_lengths(20, 1500, True, gen, with_zeros=True) + [1, 64, 65, 5000]
    p = make_problem(lengths, s_q, h_q, 1, dtype, causal=True, seed=h_q + s_q)
    want_out, want_lse = call(p, p.q)
    got_out, got_lse = call(p, halves(p.q))
    ref, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, causal=True)
    torch.cuda.synchronize()
    assert relative_error(got_out, ref.float()) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    assert_lse_close(got_lse, ref_lse)
    assert torch.equal(got_out, want_out), "the pair and the concatenated q give different outputs"
    assert torch.equal(got_lse, want_lse)


@requires_hopper
def test_pair_replays_in_a_cuda_graph_with_new_queries() -> None:
    p = make_problem([300, 5, 4096, 64], 1, 16, 1, torch.bfloat16, causal=True, seed=3)
    latent, rope = vllm_query_halves(p.q)
    md, ns = get_mla_metadata(p.cache_seqlens, 16, 1)
    out = torch.empty(4, 1, 16, 512, dtype=torch.bfloat16, device="cuda")
    flash_mla_with_kvcache((latent, rope), p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns, out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flash_mla_with_kvcache((latent, rope), p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns,
                               out=out, check_contents=False)
    following = torch.randn_like(p.q)
    new_latent, new_rope = vllm_query_halves(following)
    latent.copy_(new_latent)
    rope.copy_(new_rope)
    out.fill_(float("nan"))
    graph.replay()
    ref, _ = mla_decode_reference(following, p.k_cache, p.block_table, p.cache_seqlens, 512)
    torch.cuda.synchronize()
    assert relative_error(out, ref.float()) < 1e-2


@requires_hopper
@pytest.mark.parametrize("case,arg", [
    ("rope 8 bytes off alignment", r"q\[1\]"),
    ("latent head stride not 16 bytes", r"q\[0\]"),
    ("rope on the CPU", r"q\[1\]"),
])
def test_gpu_pair_layout_errors_name_the_half(case: str, arg: str) -> None:
    p = make_problem([100, 7], 1, 16, 1, torch.bfloat16, seed=2)
    latent, rope = p.q[..., :512], p.q[..., 512:]
    if case == "rope 8 bytes off alignment":
        rope = torch.empty(2, 1, 16, 68, dtype=torch.bfloat16, device="cuda")[..., 4:]
    elif case == "latent head stride not 16 bytes":
        latent = torch.empty(2, 1, 16, 516, dtype=torch.bfloat16, device="cuda")[..., :512]
    else:
        rope = rope.cpu()
    md, ns = get_mla_metadata(p.cache_seqlens, 16, 1)
    with pytest.raises(ValueError, match=arg):
        flash_mla_with_kvcache((latent, rope), p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns)
