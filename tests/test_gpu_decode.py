"""GPU correctness of the scheduler, decode and combine kernels against the float32 reference.

In the style of FlashMLA's own test: batch, query length, context length (fixed and variable,
with empty sequences), head counts, KV heads, causal masking and both 16-bit dtypes; inputs
carry NaN in unused cache slots, shuffled block tables and garbage ids past each end.
"""

from __future__ import annotations


import pytest
import torch

from conftest import assert_lse_close, relative_error, requires_hopper
from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata, mla_decode_reference
from flashmla_backend.schedule import schedule_reference
from flashmla_backend.testing import DecodeProblem, capture_decode_step, draw_lengths, make_problem

pytestmark = requires_hopper

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def run_and_check(p: DecodeProblem, dtype: torch.dtype, poisoned_out: bool = True) -> None:
    b, s_q, h_q, h_k = p.shape
    md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
    out = None
    if poisoned_out:
        out = torch.full((b, s_q, h_q, 512), float("nan"), dtype=dtype, device="cuda")
    inputs = [t.clone() for t in (p.q, p.k_cache, p.block_table, p.cache_seqlens)]
    got, lse = flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns,
                                      causal=p.causal, out=out)
    ref, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512,
                                        causal=p.causal)
    torch.cuda.synchronize()
    err = relative_error(got, ref.float())
    assert err < TOLERANCE[dtype], f"relative error {err:.3e} for {p.shape}, lengths {p.cache_seqlens.tolist()[:8]}"
    assert_lse_close(lse, ref_lse)
    for before, after in zip(inputs, (p.q, p.k_cache, p.block_table, p.cache_seqlens)):
        assert torch.equal(before.nan_to_num(7.0), after.nan_to_num(7.0)), "an input was modified"


# The main sweep: every batch x query length x context x (fixed | varlen with zeros), at the
# DeepSeek head counts, causal, bf16.
@pytest.mark.parametrize("batch", [1, 2, 6, 64, 128])
@pytest.mark.parametrize("s_q", [1, 2, 4])
@pytest.mark.parametrize("s_k", [1, 20, 140, 4096, 16384])
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("h_q", [16, 128])
def test_sweep_deepseek_heads(batch: int, s_q: int, s_k: int, varlen: bool, h_q: int) -> None:
    if batch * s_k > 64 * 16384 and h_q == 128 and s_q == 4:
        pytest.skip("covered by the smaller batches; keeps the sweep inside the device budget")
    gen = torch.Generator().manual_seed(batch * 1000 + s_k + s_q)
    lengths = draw_lengths(batch, s_k, varlen, gen, with_zeros=varlen)
    p = make_problem(lengths, s_q, h_q, 1, torch.bfloat16, causal=True, seed=s_k + batch)
    run_and_check(p, torch.bfloat16)


# Odd head counts, two KV heads, both causal modes, both dtypes, on smaller batches.
@pytest.mark.parametrize("h_q,h_k", [(1, 1), (3, 1), (63, 1), (64, 1), (2, 2), (6, 2), (32, 2), (128, 2)])
@pytest.mark.parametrize("s_q", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_heads_and_dtypes(h_q: int, h_k: int, s_q: int, causal: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(h_q * 7 + s_q)
    lengths = draw_lengths(6, 300, True, gen, with_zeros=True) + [1, 20, 140]
    p = make_problem(lengths, s_q, h_q, h_k, dtype, causal=causal, seed=h_q + s_q)
    run_and_check(p, dtype)


# Both KV producers on every card (the automatic rule runs only one of them per card and shape):
# one and several query blocks, odd heads, two KV heads, variable lengths with empty sequences.
@pytest.mark.parametrize("producer", ["tma", "cp_async"])
@pytest.mark.parametrize("h_q,h_k,s_q", [(16, 1, 1), (16, 1, 2), (3, 1, 4), (64, 1, 1), (128, 1, 2), (32, 2, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_both_kv_producers(producer: str, h_q: int, h_k: int, s_q: int, dtype: torch.dtype,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHMLA_BACKEND_KV_PRODUCER", producer)
    gen = torch.Generator().manual_seed(h_q * 3 + s_q)
    lengths = draw_lengths(40, 3000, True, gen, with_zeros=True) + [1, 64, 65, 8192]
    p = make_problem(lengths, s_q, h_q, h_k, dtype, causal=True, seed=h_q + 11 * s_q)
    run_and_check(p, dtype)


# Combine CTAs that serve several requests (FLASHMLA_BACKEND_COMBINE_REQUESTS_PER_CTA; 0: the rule): split and
# unsplit requests mixed in one CTA, batches not a multiple of the count, several warps per row
# (few long requests) and one (many requests), one and several query blocks.
@pytest.mark.parametrize("requests_per_cta", ["0", "2", "5", "32"])
@pytest.mark.parametrize("lengths_kind,h_q,s_q", [("few_long", 16, 1), ("few_long", 128, 2),
                                                   ("many_varlen", 16, 1), ("many_varlen", 64, 1),
                                                   ("many_varlen", 128, 2)])
def test_combine_ctas_serving_several_requests(requests_per_cta: str, lengths_kind: str, h_q: int, s_q: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHMLA_BACKEND_COMBINE_REQUESTS_PER_CTA", requests_per_cta)
    gen = torch.Generator().manual_seed(int(requests_per_cta) * 31 + h_q + s_q)
    if lengths_kind == "few_long":
        lengths = [16384, 0, 9000, 20000, 1]
    else:
        lengths = draw_lengths(97, 3000, True, gen, with_zeros=True) + [8192, 64, 65]
    p = make_problem(lengths, s_q, h_q, 1, torch.bfloat16, causal=True, seed=h_q + 7 * s_q)
    _, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q, 1)
    assert int((ns[1:] - ns[:-1]).max()) > 1, "the case must split some request"
    run_and_check(p, torch.bfloat16)


def test_long_context_mixed_batch() -> None:
    p = make_problem([1, 65536, 0, 70000, 63], 2, 16, causal=True, seed=3)
    run_and_check(p, torch.bfloat16)


# Scores that grow along the context: each row's max rises by ~1 log2 unit per page, so the
# decode keeps a stale max for several pages (P up to 2^8 before normalisation) and then raises
# it mid-piece, split or not (v26's lazy rescale; NOTES.md). A common direction in q and a
# per-token weight on it in K make q.k grow with the token position.
@pytest.mark.parametrize("h_q,s_q", [(16, 1), (128, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_max_raised_along_the_context(h_q: int, s_q: int, dtype: torch.dtype) -> None:
    lengths = [2048, 1000, 0, 4500, 64]
    p = make_problem(lengths, s_q, h_q, dtype=dtype, causal=True, seed=h_q + s_q)
    p.q.mul_(0.5).add_(1.0)
    for i, n in enumerate(lengths):
        for page in range(-(-n // 64)):
            tokens = torch.arange(page * 64, page * 64 + 64, device="cuda", dtype=torch.float32)
            weight = (tokens / 2048.0).to(dtype).view(64, 1, 1)
            physical = int(p.block_table[i, page])
            p.k_cache[physical].mul_(0.5).add_(weight)
    run_and_check(p, dtype)


# One key far above everything before it, late in a piece: against the kept max its exponential
# is ~2^86 (past the polynomial's clamp at 2^64) or ~2^173 (ex2 gives inf), so the page must be
# redone with its own max, and the O accumulated so far scaled to nothing (v28; NOTES.md).
@pytest.mark.parametrize("h_q,s_q", [(16, 1), (128, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_score_spike_far_above_the_kept_max(h_q: int, s_q: int, dtype: torch.dtype) -> None:
    lengths = [4500, 3000, 700]
    p = make_problem(lengths, s_q, h_q, dtype=dtype, causal=True, seed=7 + h_q)
    p.q.mul_(0.5).add_(1.0)  # q . k_spike ~ 576 * magnitude: ~35 log2 units per unit of magnitude
    for i, (token, magnitude) in enumerate([(3001, 5.0), (2500, 2.5), (650, 5.0)]):
        physical = int(p.block_table[i, token // 64])
        p.k_cache[physical, token % 64].fill_(magnitude)
    run_and_check(p, dtype)


def test_context_shorter_than_query_is_empty_row() -> None:
    # With s_q = 4 and one key, the first three query tokens see nothing: out 0, lse +inf.
    p = make_problem([1, 2, 3], 4, 16, causal=True, seed=4)
    run_and_check(p, torch.bfloat16)


#: Batches for the scheduler: large ones (the CTA-wide kernel) and ones of at most 32 requests
#: (the one-warp kernel): a single request, 32 lanes all busy, zero lengths among them.
SCHEDULE_LENGTHS = [[4096] * 128, [8192] * 120, [0] * 5, [1, 0, 100000], list(range(0, 4000, 37)),
                    [64 * (i % 7) for i in range(2000)], [8192], [1], [0], [2048] * 8, [4096] * 31,
                    [64 * i + 1 for i in range(32)], [0, 70000, 0, 5, 64, 65, 0] + [3000] * 25,
                    [131072] * 2 + [1] * 30, [0] * 32,
                    # Short varlen batches, where the whole-request rule applies (run 29's 32-96 keys).
                    [32 + (37 * i) % 65 for i in range(128)], [1 + (29 * i) % 190 for i in range(24)] + [0] * 4]


@pytest.mark.parametrize("lengths", SCHEDULE_LENGTHS)
@pytest.mark.parametrize("rows", [16, 128, 512])
@pytest.mark.parametrize("slack", ["0", "", "4"])
@pytest.mark.parametrize("small_schedule", ["1", "0"])
@pytest.mark.parametrize("whole", ["0", "1"])
def test_gpu_schedule_matches_python_mirror(lengths: list[int], rows: int, slack: str, small_schedule: str,
                                            whole: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if small_schedule == "0" and len(lengths) > 32:
        pytest.skip("batches over 32 requests always take the CTA-wide scheduler")
    monkeypatch.setenv("FLASHMLA_BACKEND_NO_SPLIT_SLACK", slack)
    monkeypatch.setenv("FLASHMLA_BACKEND_SMALL_SCHEDULE", small_schedule)
    monkeypatch.setenv("FLASHMLA_BACKEND_WHOLE_REQUESTS", whole)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    # Poison what the caching allocator is about to hand out again, so that a row the kernel
    # leaves unwritten cannot pass with an earlier call's values.
    for stale in get_mla_metadata(seqlens, rows, 1):
        stale.fill_(-7)
    del stale
    md, ns = get_mla_metadata(seqlens, rows, 1)
    ref_md, ref_ns = schedule_reference(seqlens.cpu(), md.shape[0])
    assert torch.equal(md.cpu(), ref_md)
    assert torch.equal(ns.cpu(), ref_ns)


@pytest.mark.parametrize("s_k", [64, 256, 1024])
@pytest.mark.parametrize("h_q,s_q", [(16, 1), (16, 2), (64, 1), (128, 1)])
@pytest.mark.parametrize("batch", [8, 100, 128])
def test_whole_request_schedule(s_k: int, h_q: int, s_q: int, batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The whole-request rule's schedules (one request per part where it applies, the usual
    # split elsewhere) through the decode and the combine, short varlen batches with empty ones.
    monkeypatch.setenv("FLASHMLA_BACKEND_WHOLE_REQUESTS", "1")
    gen = torch.Generator().manual_seed(batch + s_k + h_q + s_q)
    lengths = draw_lengths(batch, s_k, True, gen, with_zeros=True)
    p = make_problem(lengths, s_q, h_q, 1, torch.bfloat16, causal=True, seed=s_k + batch)
    run_and_check(p, torch.bfloat16)
    md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q, 1)
    ref_md, ref_ns = schedule_reference(p.cache_seqlens.cpu(), md.shape[0], whole=True)
    assert torch.equal(md.cpu(), ref_md) and torch.equal(ns.cpu(), ref_ns)
    if s_k == 64 and h_q * s_q <= 64 and batch >= 100:
        assert int(ns[-1]) == batch, "the rule should give every request a part of its own here"


def test_schedule_reused_across_layers() -> None:
    gen = torch.Generator().manual_seed(11)
    lengths = draw_lengths(32, 2000, True, gen, with_zeros=True)
    first = make_problem(lengths, 1, 16, seed=0)
    layers = [first]
    # Every layer shares one block table and length vector, as in a decode step; each has its
    # own queries and cache values, poisoned in the same unused slots.
    for _ in range(2):
        k_cache = torch.randn_like(first.k_cache).masked_fill(torch.isnan(first.k_cache), float("nan"))
        layers.append(DecodeProblem(torch.randn_like(first.q), k_cache, first.block_table,
                                    first.cache_seqlens, True))
    md, ns = get_mla_metadata(layers[0].cache_seqlens, 16, 1)
    for layer in layers:
        out, lse = flash_mla_with_kvcache(layer.q, layer.k_cache, layer.block_table, layer.cache_seqlens,
                                          512, md, ns, causal=True)
        ref, ref_lse = mla_decode_reference(layer.q, layer.k_cache, layer.block_table,
                                            layer.cache_seqlens, 512, causal=True)
        assert relative_error(out, ref.float()) < 1e-2
        assert_lse_close(lse, ref_lse)


def check_graph_replay(batch: int, s_q: int, h_q: int, seed: int, steps: int = 5) -> None:
    """One captured decode step replayed with new lengths (0 to 3000) and new q each time,
    against the reference."""
    base = make_problem([3000] * batch, s_q, h_q, causal=True, seed=seed)
    seqlens = base.cache_seqlens.clone()
    static_q = base.q.clone()
    graph, out, lse = capture_decode_step(static_q, base.k_cache, base.block_table, seqlens)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        new_lengths = torch.randint(0, 3001, (batch,), generator=gen, dtype=torch.int32)
        seqlens.copy_(new_lengths)
        static_q.copy_(torch.randn(static_q.shape, generator=gen).to(static_q.dtype))
        graph.replay()
        ref, ref_lse = mla_decode_reference(static_q, base.k_cache, base.block_table, seqlens, 512, causal=True)
        torch.cuda.synchronize()
        assert relative_error(out, ref.float()) < 1e-2, f"replay {step}"
        assert_lse_close(lse, ref_lse)


def test_cuda_graph_replay_with_new_lengths() -> None:
    check_graph_replay(batch=8, s_q=2, h_q=16, seed=21)


def test_returns_new_tensors_without_out() -> None:
    p = make_problem([500, 0, 77], 1, 16, seed=9)
    run_and_check(p, torch.bfloat16, poisoned_out=False)


def test_decode_version_row_limit_is_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    # v43 (benchmarks/kernel_versions) takes at most 32 query rows per KV head: 64 are refused
    # before any launch, and 32 still run.
    from pathlib import Path

    version = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_versions" / "mla_decode_v43_heads_on_n.cu"
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_FILE", str(version))
    p = make_problem([300, 70], 1, 64, causal=True, seed=3)
    md, ns = get_mla_metadata(p.cache_seqlens, 64, 1)
    with pytest.raises(ValueError, match="64 query rows per KV head.*at most 32"):
        flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns, causal=True)
    run_and_check(make_problem([300, 70], 2, 16, causal=True, seed=4), torch.bfloat16)


@pytest.mark.parametrize("h_q,s_q", [(16, 1), (16, 2), (3, 4), (64, 1), (128, 2)])
def test_few_rows_decode_beside_the_main_one(h_q: int, s_q: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # FLASHMLA_BACKEND_FEW_ROWS_DECODE_FILE (v43 here): calls with at most 32 rows per KV head go
    # to it, the others to the shipped decode; both must match the reference.
    from pathlib import Path

    version = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_versions" / "mla_decode_v43_heads_on_n.cu"
    monkeypatch.setenv("FLASHMLA_BACKEND_FEW_ROWS_DECODE_FILE", str(version))
    gen = torch.Generator().manual_seed(h_q * 5 + s_q)
    p = make_problem(draw_lengths(6, 900, True, gen), s_q, h_q, causal=True, seed=h_q + s_q)
    run_and_check(p, torch.bfloat16)


def test_noncontiguous_q_view() -> None:
    # q sliced out of a wider buffer (as vLLM's q_nope/q_pe concat may produce).
    p = make_problem([700, 1300], 2, 16, seed=10)
    wide = torch.randn(2, 2, 32, 576, device="cuda", dtype=torch.bfloat16)
    wide[:, :, ::2] = p.q
    p.q = wide[:, :, ::2]
    run_and_check(p, torch.bfloat16)


