"""Property tests (hypothesis): random invalid inputs always raise a clean TypeError/ValueError
and leave the inputs untouched (CPU); random valid problems match the reference (GPU).
The counts tried are printed in pytest's terminal summary."""

from __future__ import annotations

from typing import Any, Callable

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PROPERTY_COUNTS, assert_lse_close, relative_error, requires_hopper
from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata, mla_decode_reference
from flashmla_backend.testing import make_problem

ARG_NAMES = ("q", "k_cache", "block_table", "cache_seqlens", "head_dim_v", "tile_scheduler_metadata",
             "num_splits", "softmax_scale", "causal", "out")


def valid_args(lengths: list[int], s_q: int, h_q: int, h_k: int, dtype: torch.dtype) -> dict[str, Any]:
    p = make_problem(lengths, s_q, h_q, h_k, dtype=dtype, device="cpu", seed=len(lengths) + h_q)
    md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
    return dict(q=p.q, k_cache=p.k_cache, block_table=p.block_table, cache_seqlens=p.cache_seqlens,
                head_dim_v=512, tile_scheduler_metadata=md, num_splits=ns, softmax_scale=None,
                causal=True, out=None)


def _tensor_mutations(t: torch.Tensor) -> list[Callable[[], Any]]:
    """Ways to break one tensor argument."""
    muts: list[Callable[[], Any]] = [
        lambda: t.to(torch.float32) if t.is_floating_point() else t.to(torch.int64),
        lambda: t.to(torch.float64),
        lambda: t.to(torch.int16),
        lambda: t.unsqueeze(0),
        lambda: t.reshape(-1),
        lambda: t.tolist(),
        lambda: None,
        lambda: 3,
        lambda: torch.empty(t.shape, dtype=t.dtype, device="meta"),
    ]
    if t.dim() >= 1 and t.shape[-1] > 1:
        muts.append(lambda: torch.cat([t, t], -1)[..., ::2])   # last dim strided
        muts.append(lambda: t[..., :-1])                        # last dim too short
    if t.dim() >= 1 and t.shape[0] > 1:
        muts.append(lambda: t[:-1])                             # leading dim off by one
    return muts


def _value_mutations(args: dict[str, Any]) -> list[tuple[str, Callable[[], Any]]]:
    """Ways to break contents (lengths, page ids) or the scalar arguments."""
    bt, sl, kc = args["block_table"], args["cache_seqlens"], args["k_cache"]
    out: list[tuple[str, Callable[[], Any]]] = [
        ("cache_seqlens", lambda: sl - sl.max() - 1),
        ("cache_seqlens", lambda: sl + 64 * bt.shape[1]),
        ("block_table", lambda: bt.clone().fill_(kc.shape[0])),
        ("block_table", lambda: bt.clone().fill_(-7)),
        ("head_dim_v", lambda: 576),
        ("head_dim_v", lambda: "512"),
        ("softmax_scale", lambda: -1.0),
        ("softmax_scale", lambda: float("inf")),
        ("softmax_scale", lambda: [0.1]),
        ("causal", lambda: "yes"),
        ("out", lambda: torch.empty(1, dtype=args["q"].dtype)),
        ("out", lambda: torch.empty(*args["q"].shape[:3], 512, dtype=torch.float32)),
    ]
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 300), min_size=1, max_size=4),
    s_q=st.integers(1, 3),
    heads=st.sampled_from([(1, 1), (4, 1), (4, 2), (6, 3)]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    pick=st.integers(0, 10_000),
)
def test_random_invalid_inputs_raise_cleanly(lengths: list[int], s_q: int, heads: tuple[int, int],
                                             dtype: torch.dtype, pick: int) -> None:
    if max(lengths) == 0:
        lengths = lengths + [1]
    h_q, h_k = heads
    args = valid_args(lengths, s_q, h_q, h_k, dtype)
    candidates: list[tuple[str, Callable[[], Any]]] = list(_value_mutations(args))
    for name in ("q", "k_cache", "block_table", "cache_seqlens", "tile_scheduler_metadata", "num_splits"):
        candidates += [(name, m) for m in _tensor_mutations(args[name])]
    name, mutate = candidates[pick % len(candidates)]
    args[name] = mutate()
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    PROPERTY_COUNTS["invalid inputs tried"] += 1
    try:
        flash_mla_with_kvcache(**args)
    except (TypeError, ValueError) as exc:
        assert str(exc), "empty error message"
    except Exception as exc:  # noqa: BLE001 - the property is that nothing else escapes
        PROPERTY_COUNTS["invalid inputs unclean"] += 1
        raise AssertionError(f"{name}: {type(exc).__name__} escaped: {exc}") from exc
    else:
        # Some mutations keep the call valid (e.g. a length that still fits): then it must
        # agree with the reference.
        PROPERTY_COUNTS["mutations that stayed valid"] += 1
    for k, v in snapshot.items():
        assert torch.equal(v.nan_to_num(5.0), args[k].nan_to_num(5.0)), f"{k} was modified"


@requires_hopper
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 5000), min_size=1, max_size=24),
    s_q=st.integers(1, 4),
    heads=st.sampled_from([(1, 1), (16, 1), (33, 1), (64, 1), (128, 1), (8, 2), (128, 2)]),
    causal=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_random_valid_problems_match_reference(lengths: list[int], s_q: int, heads: tuple[int, int],
                                               causal: bool, dtype: torch.dtype, seed: int) -> None:
    h_q, h_k = heads
    p = make_problem(lengths, s_q, h_q, h_k, dtype=dtype, causal=causal, seed=seed)
    md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
    out, lse = flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns, causal=causal)
    ref, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, causal=causal)
    PROPERTY_COUNTS["random GPU problems checked"] += 1
    assert relative_error(out, ref.float()) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    assert_lse_close(lse, ref_lse)


