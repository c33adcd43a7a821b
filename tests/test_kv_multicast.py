"""Pages shared by TMA multicast within clusters of query blocks (an A/B knob:
``FLASHMLA_BACKEND_KV_CLUSTER`` = 2 or 4 builds the decode with ``-DKV_MULTICAST=1`` and
launches clusters along x). On CPU: the setting, the cluster choice and the knob's SASS; on a
Hopper GPU: the clustered decode equal to the float32 reference, under graph replay too."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import assert_lse_close, relative_error, requires_hopper
from flashmla_backend import get_mla_metadata, mla_decode_reference
from flashmla_backend.api import kv_cluster_ctas
from flashmla_backend.kernel_sources import decode_module
from flashmla_backend.settings import KV_CLUSTER_ENV, settings
from flashmla_backend.testing import make_problem


@pytest.mark.parametrize("raw", ["0", "3", "8", "two"])
def test_bad_cluster_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(KV_CLUSTER_ENV, raw)
    with pytest.raises(ValueError, match=KV_CLUSTER_ENV):
        settings()


def test_setting_adds_the_multicast_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KV_CLUSTER_ENV, raising=False)
    assert settings().kv_cluster == 1
    assert "-DKV_MULTICAST=1" not in decode_module(torch.bfloat16, True).options
    monkeypatch.setenv(KV_CLUSTER_ENV, "4")
    assert settings().kv_cluster == 4
    assert "-DKV_MULTICAST=1" in decode_module(torch.bfloat16, True).options


@pytest.mark.parametrize(("m_blocks", "most", "expected"), [
    (1, 4, 1), (2, 1, 1), (2, 2, 2), (2, 4, 2), (3, 4, 1), (4, 2, 2), (4, 4, 4), (6, 4, 2), (8, 4, 4)])
def test_cluster_is_the_largest_power_of_two_dividing_the_query_blocks(m_blocks: int, most: int,
                                                                        expected: int) -> None:
    assert kv_cluster_ctas(m_blocks, most) == expected


def test_multicast_build_loads_by_multicast_without_gpu_wide_fences() -> None:
    # Each CTA multicasts its share of the chunks; a stage's remote release is a plain
    # (CTA-scope) arrive: a cluster-scope release would put a MEMBAR.ALL.GPU on every page.
    from test_kernel_compile import sass

    from flashmla_backend.kernel_sources import KernelModule

    base = decode_module(torch.bfloat16, True)
    text = sass(KernelModule(base.source_file, base.entry_points, base.dtype,
                             base.extra_defines + ("-DKV_MULTICAST=1",)))
    assert re.search(r"\bUTMALDG\.4D\.MULTICAST\b", text)
    assert len(re.findall(r"\bMEMBAR\.ALL\.GPU\b", text)) <= 2  # the two cluster barriers
    assert "UTMALDG.4D.MULTICAST" not in sass(base)


def _check_clustered(lengths: list[int], s_q: int, h_q: int, dtype: torch.dtype, seed: int,
                     expect_cluster: bool) -> None:
    from test_gpu_decode import TOLERANCE

    from flashmla_backend import flash_mla_with_kvcache
    from flashmla_backend.api import decode_cluster_ctas

    p = make_problem(lengths, s_q, h_q, dtype=dtype, seed=seed)
    md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q, 1)
    m_blocks = -(-s_q * h_q // 64)
    cluster = decode_cluster_ctas(torch.cuda.current_device(), dtype, (m_blocks, 1, md.shape[0]))
    assert (cluster > 1) == expect_cluster, f"cluster {cluster} for {m_blocks} query blocks"
    out = torch.full((len(lengths), s_q, h_q, 512), float("nan"), dtype=dtype, device="cuda")
    cache_before = p.k_cache.clone()
    got, lse = flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns,
                                      causal=p.causal, out=out)
    ref, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, causal=p.causal)
    torch.cuda.synchronize()
    assert relative_error(got, ref.float()) < TOLERANCE[dtype]
    assert_lse_close(lse, ref_lse)
    assert torch.equal(cache_before.nan_to_num(7.0), p.k_cache.nan_to_num(7.0)), "the cache was modified"


@requires_hopper
@pytest.mark.parametrize("most", [2, 4])
@pytest.mark.parametrize(("lengths", "s_q", "h_q", "dtype", "expect_cluster"), [
    ([4096] * 8, 1, 128, torch.bfloat16, True),                 # 2 query blocks, whole pages
    ([8192], 1, 128, torch.bfloat16, True),                     # one request split over every part
    ([1, 0, 5000, 300, 64, 65], 2, 128, torch.float16, True),   # 4 blocks, empty and short requests
    ([777] * 3, 3, 128, torch.bfloat16, True),                  # 6 blocks: clusters of 2
    ([2048] * 8, 1, 64, torch.bfloat16, False),                 # 1 block: the build without clusters
])
def test_clustered_decode_matches_reference(monkeypatch: pytest.MonkeyPatch, most: int, lengths: list[int],
                                            s_q: int, h_q: int, dtype: torch.dtype, expect_cluster: bool) -> None:
    monkeypatch.setenv(KV_CLUSTER_ENV, str(most))
    _check_clustered(lengths, s_q, h_q, dtype, seed=len(lengths) + most, expect_cluster=expect_cluster)


@requires_hopper
def test_clustered_decode_under_graph_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_gpu_decode import check_graph_replay

    monkeypatch.setenv(KV_CLUSTER_ENV, "2")
    check_graph_replay(batch=8, s_q=1, h_q=128, seed=31, steps=4)
