"""Which source the decode module compiles: the shipped one, or an archived version named by
``FLASHMLA_BACKEND_DECODE_FILE`` for A/B runs (CPU only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashmla_backend.kernel_sources import decode_module

ARCHIVED = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_versions"


def test_unset_or_empty_override_means_the_shipped_source(monkeypatch: pytest.MonkeyPatch) -> None:
    # An A/B script exports an empty value for its shipped runs; that must not resolve to the
    # kernels folder (a device run failed that way on 2026-11-28).
    monkeypatch.delenv("FLASHMLA_BACKEND_DECODE_FILE", raising=False)
    assert decode_module(torch.bfloat16).source_file == "mla_decode.cu"
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_FILE", "")
    assert decode_module(torch.bfloat16).source_file == "mla_decode.cu"


def test_override_names_an_archived_version(monkeypatch: pytest.MonkeyPatch) -> None:
    archived = sorted(ARCHIVED.glob("*.cu"))[0]
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_FILE", str(archived))
    assert decode_module(torch.float16).source_file == str(archived)


def test_defines_for_an_archived_version_are_passed_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_DEFINES", "-DDIAG_STAGES=3")
    assert "-DDIAG_STAGES=3" in decode_module(torch.bfloat16).options
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_DEFINES", "--use_fast_math")
    with pytest.raises(ValueError, match="only -D options"):
        decode_module(torch.bfloat16)


def test_combine_knobs_are_passed_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from flashmla_backend.kernel_sources import combine_module

    monkeypatch.setenv("FLASHMLA_BACKEND_COMBINE_DEFINES", "-DCOMBINE_SPLITS_IN_FLIGHT=1")
    assert "-DCOMBINE_SPLITS_IN_FLIGHT=1" in combine_module(torch.bfloat16, True).options
    monkeypatch.setenv("FLASHMLA_BACKEND_COMBINE_DEFINES", "-O3")
    with pytest.raises(ValueError, match="COMBINE_DEFINES"):
        combine_module(torch.bfloat16)


def test_tma_box_follows_the_decode_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The shipped decode loads whole 64-token pages; a version that declares half-page boxes
    # (as v7 did) must get its KV tensor map encoded with them.
    from flashmla_backend.kernel_sources import decode_launch_contract

    monkeypatch.delenv("FLASHMLA_BACKEND_DECODE_FILE", raising=False)
    assert decode_launch_contract(decode_module(torch.bfloat16)).tma_box_tokens == 64
    half_pages = tmp_path / "half_pages.cu"
    half_pages.write_text("constexpr int TMA_BOX_TOKENS = 32;\n")
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_FILE", str(half_pages))
    assert decode_launch_contract(decode_module(torch.bfloat16)).tma_box_tokens == 32


def test_group_major_map_names_a_head_stride_it_cannot_map() -> None:
    # With several KV heads, head kh's chunks are chunks 9 kh.. of one map dimension, so the
    # heads of a token must be 576 elements apart; other layouts get a ValueError, not a bad map.
    from flashmla_backend.tensor_map import kv_cache_group_major_map

    padded = torch.zeros(2, 64, 2, 640, dtype=torch.bfloat16)[..., :576]
    with pytest.raises(ValueError, match=r"k_cache: .*stride\(2\) == 576"):
        kv_cache_group_major_map(padded)
    with pytest.raises(ValueError, match="boxes_per_page"):
        kv_cache_group_major_map(torch.zeros(2, 64, 1, 576, dtype=torch.bfloat16), 3)


def test_kv_maps_encode_the_cache_geometry_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # What each map asks the driver for (recorded instead of encoded, no GPU needed), and that a
    # second call with the same cache is served from the cache.
    from flashmla_backend import tensor_map

    calls = []
    monkeypatch.setattr(tensor_map, "_encode", lambda *args: calls.append(args[2:]) or bytes(128))
    monkeypatch.setattr(tensor_map, "_cache", {})
    cache = torch.zeros(10, 64, 1, 576, dtype=torch.bfloat16)
    for _ in range(2):
        tensor_map.kv_cache_tensor_map(cache)
        tensor_map.kv_cache_group_major_map(cache)
        tensor_map.kv_cache_group_major_map(cache, 2)
    assert calls == [
        ((576, 1, 64, 10), (1152, 1152, 73728), (64, 1, 64, 1)),
        ((64, 8, 9, 8, 10), (1152, 128, 9216, 73728), (64, 8, 9, 8, 1)),
        ((64, 8, 9, 8, 10), (1152, 128, 9216, 73728), (64, 8, 9, 4, 1)),
    ]


def test_tensor_map_rejects_other_box_heights() -> None:
    from flashmla_backend.tensor_map import kv_cache_tensor_map

    with pytest.raises(ValueError, match="box_tokens"):
        kv_cache_tensor_map(torch.zeros(2, 64, 1, 576, dtype=torch.bfloat16), box_tokens=12)


def test_l2_promotion_override_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from flashmla_backend.tensor_map import l2_promotion

    assert l2_promotion() == 3
    monkeypatch.setenv("FLASHMLA_BACKEND_TMA_L2_PROMOTION", "0")
    assert l2_promotion() == 0
    monkeypatch.setenv("FLASHMLA_BACKEND_TMA_L2_PROMOTION", "256B")
    with pytest.raises(ValueError, match="TMA_L2_PROMOTION"):
        l2_promotion()


def test_launch_contract_of_pointer_and_producer_choice(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # The shipped decode takes the cache pointer and the producer choice; a version that
    # declares neither gets neither; one that declares a choice without the pointer is
    # refused before any launch could pass it misplaced arguments.
    from flashmla_backend.kernel_sources import decode_launch_contract

    monkeypatch.delenv("FLASHMLA_BACKEND_DECODE_FILE", raising=False)
    shipped = decode_launch_contract(decode_module(torch.bfloat16))
    assert shipped.takes_kv_pointer and shipped.selects_kv_producer and shipped.takes_q_rope_pointer
    plain = tmp_path / "plain.cu"
    plain.write_text("constexpr int TMA_BOX_TOKENS = 64;\n")
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_FILE", str(plain))
    neither = decode_launch_contract(decode_module(torch.bfloat16))
    assert not neither.takes_kv_pointer and not neither.selects_kv_producer
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_FILE", str(ARCHIVED / "mla_decode_diag_pipeline_only.cu"))
    diag = decode_launch_contract(decode_module(torch.bfloat16))
    assert diag.takes_kv_pointer and not diag.selects_kv_producer and not diag.takes_q_rope_pointer
    rope_alone = tmp_path / "rope_without_choice.cu"
    rope_alone.write_text("constexpr bool TAKES_KV_POINTER = true;\nconstexpr bool TAKES_Q_ROPE_POINTER = true;\n")
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_FILE", str(rope_alone))
    with pytest.raises(ValueError, match="SELECTS_KV_PRODUCER"):
        decode_launch_contract(decode_module(torch.bfloat16))
    bad = tmp_path / "choice_without_pointer.cu"
    bad.write_text("constexpr bool SELECTS_KV_PRODUCER = true;\n")
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_FILE", str(bad))
    with pytest.raises(ValueError, match="TAKES_KV_POINTER"):
        decode_launch_contract(decode_module(torch.bfloat16))


def test_launch_contract_limits_query_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # A version built for few query rows per KV head (v43: rows on the wgmma N dimension)
    # declares its limit; the shipped decode has none.
    from flashmla_backend.kernel_sources import decode_launch_contract

    monkeypatch.delenv("FLASHMLA_BACKEND_DECODE_FILE", raising=False)
    assert decode_launch_contract(decode_module(torch.bfloat16)).max_query_rows is None
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_FILE", str(ARCHIVED / "mla_decode_v43_heads_on_n.cu"))
    v43 = decode_launch_contract(decode_module(torch.bfloat16))
    assert v43.max_query_rows == 32 and v43.takes_q_rope_pointer


def test_few_rows_decode_is_built_only_beside_the_shipped_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    # FLASHMLA_BACKEND_FEW_ROWS_DECODE_FILE adds a second decode for few query rows per KV head
    # (precompile builds it); while DECODE_FILE swaps the main decode for an A/B it is left out.
    from flashmla_backend.kernel_sources import all_modules, few_rows_decode_module

    v43 = str(ARCHIVED / "mla_decode_v43_heads_on_n.cu")
    monkeypatch.delenv("FLASHMLA_BACKEND_DECODE_FILE", raising=False)
    monkeypatch.delenv("FLASHMLA_BACKEND_FEW_ROWS_DECODE_FILE", raising=False)
    assert few_rows_decode_module(torch.bfloat16) is None
    assert not any(m.source_file == v43 for m in all_modules())
    monkeypatch.setenv("FLASHMLA_BACKEND_FEW_ROWS_DECODE_FILE", v43)
    module = few_rows_decode_module(torch.bfloat16, programmatic=True)
    assert module is not None and module.source_file == v43 and "-DMLA_PROGRAMMATIC_LAUNCH" in module.defines
    assert sum(m.source_file == v43 for m in all_modules()) == 4  # two dtypes, launched both ways
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_FILE", str(ARCHIVED / "mla_decode_v31a_consumer_refills.cu"))
    assert few_rows_decode_module(torch.bfloat16) is None


def test_few_rows_decode_must_declare_its_row_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from flashmla_backend.kernel_sources import few_rows_decode_module

    monkeypatch.delenv("FLASHMLA_BACKEND_DECODE_FILE", raising=False)
    monkeypatch.setenv("FLASHMLA_BACKEND_FEW_ROWS_DECODE_FILE", str(ARCHIVED / "mla_decode_v31a_consumer_refills.cu"))
    with pytest.raises(ValueError, match="FLASHMLA_BACKEND_FEW_ROWS_DECODE_FILE: .* declares no MAX_QUERY_ROWS"):
        few_rows_decode_module(torch.bfloat16)


def test_decode_is_chosen_by_query_rows() -> None:
    from flashmla_backend.api import _CallKernels, _Decode
    from flashmla_backend.kernel_sources import DecodeLaunchContract, decode_signature
    from flashmla_backend.settings import Settings

    def loaded(max_rows: int | None) -> _Decode:
        contract = DecodeLaunchContract(64, True, True, True, max_rows)
        return _Decode(id(contract), contract, decode_signature(contract))

    main, few = loaded(None), loaded(32)
    both = _CallKernels(Settings(), main, few, 0, 1)
    assert both.decode_for(16) is few and both.decode_for(32) is few
    assert both.decode_for(33) is main and both.decode_for(128) is main
    assert _CallKernels(Settings(), main, None, 0, 1).decode_for(16) is main
    # A main decode with a row limit (FLASHMLA_BACKEND_DECODE_FILE=v43) refuses larger calls.
    limited = _CallKernels(Settings(decode_file="v43.cu"), few, None, 0, 1)
    assert limited.decode_for(32) is few
    with pytest.raises(ValueError, match="q: 64 query rows per KV head .* v43.cu takes at most 32"):
        limited.decode_for(64)


def test_every_module_is_built_with_flush_to_zero() -> None:
    """The softmax needs denormals flushed (kernel_sources.NVRTC_OPTIONS); CuPy's default is not
    relied on."""
    from flashmla_backend.kernel_sources import NVRTC_OPTIONS, all_modules

    assert "-ftz=true" in NVRTC_OPTIONS
    assert all("-ftz=true" in module.options for module in all_modules())
