"""Every bad input raises a TypeError/ValueError that names the argument; inputs stay untouched."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata
from flashmla_backend.testing import make_problem


def good_args() -> dict[str, Any]:
    p = make_problem([70, 0, 130], 2, 4, 1, device="cpu", seed=0)
    md, ns = get_mla_metadata(p.cache_seqlens, 8, 1)
    return dict(q=p.q, k_cache=p.k_cache, block_table=p.block_table, cache_seqlens=p.cache_seqlens,
                head_dim_v=512, tile_scheduler_metadata=md, num_splits=ns, softmax_scale=None,
                causal=True, out=None)


def _set(key: str, make: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], None]:
    def apply(a: dict[str, Any]) -> None:
        a[key] = make(a)
    return apply


def _table_too_narrow(a: dict[str, Any]) -> None:
    a["block_table"] = a["block_table"][:, :2].contiguous()


def _page_out_of_range(a: dict[str, Any]) -> None:
    t = a["block_table"].clone()
    t[2, 1] = a["k_cache"].shape[0] + 5
    a["block_table"] = t


def _negative_page(a: dict[str, Any]) -> None:
    t = a["block_table"].clone()
    t[0, 0] = -1
    a["block_table"] = t


def _negative_length(a: dict[str, Any]) -> None:
    s = a["cache_seqlens"].clone()
    s[1] = -3
    a["cache_seqlens"] = s


CASES: list[tuple[str, Callable[[dict[str, Any]], None], type[Exception], str]] = [
    ("q not a tensor", _set("q", lambda a: a["q"].tolist()), TypeError, "q"),
    ("q float32", _set("q", lambda a: a["q"].float()), TypeError, "q"),
    ("q 3-D", _set("q", lambda a: a["q"][:, 0]), ValueError, "q"),
    ("q head 512", _set("q", lambda a: a["q"][..., :512]), ValueError, "q"),
    ("q last dim strided", _set("q", lambda a: torch.cat([a["q"], a["q"]], -1)[..., ::2]), ValueError, "q"),
    # q as a (latent, rope) pair
    ("q pair of three", _set("q", lambda a: (a["q"][..., :512], a["q"][..., 512:], a["q"])), TypeError, "q"),
    ("q pair with a float", _set("q", lambda a: (a["q"][..., :512], 1.0)), TypeError, "q"),
    ("q latent 576 columns", _set("q", lambda a: (a["q"], a["q"][..., 512:])), ValueError, r"q\[0\]"),
    ("q latent float32", _set("q", lambda a: (a["q"][..., :512].float(), a["q"][..., 512:].float())),
     TypeError, r"q\[0\]"),
    ("q rope 32 columns", _set("q", lambda a: (a["q"][..., :512], a["q"][..., 512:544])), ValueError, r"q\[1\]"),
    ("q rope dtype", _set("q", lambda a: (a["q"][..., :512], a["q"][..., 512:].half())), TypeError, r"q\[1\]"),
    ("q rope heads", _set("q", lambda a: (a["q"][..., :512], a["q"][:, :, :2, 512:])), ValueError, r"q\[1\]"),
    ("q rope 3-D", _set("q", lambda a: (a["q"][..., :512], a["q"][:, 0, :, 512:])), ValueError, r"q\[1\]"),
    ("q rope last dim strided",
     _set("q", lambda a: (a["q"][..., :512], torch.cat([a["q"][..., 512:]] * 2, -1)[..., ::2])), ValueError, r"q\[1\]"),
    ("k_cache dtype", _set("k_cache", lambda a: a["k_cache"].half()), TypeError, "k_cache"),
    ("k_cache 3-D", _set("k_cache", lambda a: a["k_cache"][:, :, 0]), ValueError, "k_cache"),
    ("k_cache page 32", _set("k_cache", lambda a: a["k_cache"][:, :32]), ValueError, "k_cache"),
    ("k_cache head 512", _set("k_cache", lambda a: a["k_cache"][..., :512]), ValueError, "k_cache"),
    ("h_q % h_k", _set("k_cache", lambda a: torch.cat([a["k_cache"]] * 3, 2)), ValueError, "h_q"),
    ("block_table int64", _set("block_table", lambda a: a["block_table"].long()), TypeError, "block_table"),
    ("block_table 1-D", _set("block_table", lambda a: a["block_table"][0]), ValueError, "block_table"),
    ("block_table rows", _set("block_table", lambda a: a["block_table"][:2]), ValueError, "block_table"),
    ("block_table column-major", _set("block_table", lambda a: a["block_table"].t().contiguous().t()),
     ValueError, "block_table"),
    ("block_table too narrow", _table_too_narrow, ValueError, "block_table"),
    ("page id out of range", _page_out_of_range, ValueError, "block_table"),
    ("negative page id", _negative_page, ValueError, "block_table"),
    ("seqlens int64", _set("cache_seqlens", lambda a: a["cache_seqlens"].long()), TypeError, "cache_seqlens"),
    ("seqlens 2-D", _set("cache_seqlens", lambda a: a["cache_seqlens"][None]), ValueError, "cache_seqlens"),
    ("seqlens batch", _set("cache_seqlens", lambda a: a["cache_seqlens"][:2]), ValueError, "cache_seqlens"),
    ("negative length", _negative_length, ValueError, "cache_seqlens"),
    ("head_dim_v 128", _set("head_dim_v", lambda a: 128), ValueError, "head_dim_v"),
    ("head_dim_v float", _set("head_dim_v", lambda a: 512.0), TypeError, "head_dim_v"),
    ("metadata int64", _set("tile_scheduler_metadata", lambda a: a["tile_scheduler_metadata"].long()),
     TypeError, "tile_scheduler_metadata"),
    ("metadata shape", _set("tile_scheduler_metadata", lambda a: a["tile_scheduler_metadata"][:, :4]),
     ValueError, "tile_scheduler_metadata"),
    ("metadata for another shape", _set("tile_scheduler_metadata", lambda a: a["tile_scheduler_metadata"][:-1]),
     ValueError, "tile_scheduler_metadata"),
    ("num_splits from another batch", _set("num_splits", lambda a: a["num_splits"][:3]), ValueError, "num_splits"),
    ("num_splits float", _set("num_splits", lambda a: a["num_splits"].float()), TypeError, "num_splits"),
    ("scale negative", _set("softmax_scale", lambda a: -0.1), ValueError, "softmax_scale"),
    ("scale nan", _set("softmax_scale", lambda a: float("nan")), ValueError, "softmax_scale"),
    ("scale string", _set("softmax_scale", lambda a: "0.1"), TypeError, "softmax_scale"),
    ("causal int", _set("causal", lambda a: 1), TypeError, "causal"),
    ("out shape", _set("out", lambda a: torch.empty(3, 2, 4, 576, dtype=torch.bfloat16)), ValueError, "out"),
    ("out dtype", _set("out", lambda a: torch.empty(3, 2, 4, 512, dtype=torch.float16)), TypeError, "out"),
    ("out strided", _set("out", lambda a: torch.empty(3, 2, 8, 512, dtype=torch.bfloat16)[:, :, ::2]),
     ValueError, "out"),
]


@pytest.mark.parametrize("name,mutate,exc,arg", CASES, ids=[c[0] for c in CASES])
def test_bad_decode_input_names_the_argument(name: str, mutate: Callable, exc: type[Exception], arg: str) -> None:
    args = good_args()
    mutate(args)
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=arg):
        flash_mla_with_kvcache(**args)
    for k, v in snapshot.items():
        assert torch.equal(v.nan_to_num(3.0), args[k].nan_to_num(3.0)), f"{k} was modified"


def test_good_arguments_pass() -> None:
    out, lse = flash_mla_with_kvcache(**good_args())
    assert out.shape == (3, 2, 4, 512) and lse.shape == (3, 4, 2)


@pytest.mark.parametrize("kwargs,exc,arg", [
    (dict(is_fp8_kvcache=True), ValueError, "is_fp8_kvcache"),
    (dict(indices=torch.zeros(1)), ValueError, "indices"),
])
def test_unsupported_flashmla_features(kwargs: dict, exc: type[Exception], arg: str) -> None:
    with pytest.raises(exc, match=arg):
        flash_mla_with_kvcache(**good_args(), **kwargs)


@pytest.mark.parametrize("args,exc,arg", [
    ((torch.tensor([1, 2]), 16, 1), TypeError, "cache_seqlens"),
    ((torch.tensor([[1, 2]], dtype=torch.int32), 16, 1), ValueError, "cache_seqlens"),
    ((torch.tensor([], dtype=torch.int32), 16, 1), ValueError, "cache_seqlens"),
    ((torch.tensor([1, 2], dtype=torch.int32), 0, 1), ValueError, "num_q_tokens_per_head_k"),
    ((torch.tensor([1, 2], dtype=torch.int32), 16.0, 1), TypeError, "num_q_tokens_per_head_k"),
    ((torch.tensor([1, 2], dtype=torch.int32), 16, 0), ValueError, "num_heads_k"),
    (([1, 2], 16, 1), TypeError, "cache_seqlens"),
])
def test_bad_metadata_input_names_the_argument(args: tuple, exc: type[Exception], arg: str) -> None:
    with pytest.raises(exc, match=arg):
        get_mla_metadata(*args)


def test_fp8_metadata_rejected() -> None:
    with pytest.raises(ValueError, match="is_fp8_kvcache"):
        get_mla_metadata(torch.tensor([1], dtype=torch.int32), 16, 1, is_fp8_kvcache=True)


def test_query_layout_problem_names_what_the_16_byte_loads_cannot_read() -> None:
    from flashmla_backend.validation import query_layout_problem

    assert query_layout_problem("q[1]", torch.zeros(2, 1, 16, 64, dtype=torch.bfloat16)) is None
    assert query_layout_problem("q[1]", torch.zeros(2, 1, 16, 192, dtype=torch.bfloat16)[..., 128:]) is None
    off = torch.zeros(2, 1, 16, 68, dtype=torch.bfloat16)[..., 4:]  # 136-byte head stride, base 8 bytes in
    assert "h_q stride" in query_layout_problem("q[1]", off)
    assert "16-byte aligned" in query_layout_problem("q[1]", torch.zeros(2, 1, 1, 72, dtype=torch.bfloat16)[..., 4:68])
    assert "last dimension" in query_layout_problem("q", torch.zeros(2, 1, 16, 128, dtype=torch.bfloat16)[..., ::2])
