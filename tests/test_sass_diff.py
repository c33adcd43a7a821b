"""``benchmarks/sass_diff.py`` (CPU only): how many of the shipped decode's instructions around
its wgmmas a version leaves unmatched."""

from __future__ import annotations

import pytest

from benchmark_scripts import load_benchmark_script


sass_diff = load_benchmark_script("sass_diff")


def test_drift_counts_only_the_wgmma_windows() -> None:
    body = [f"FFMA R, R, R, R  # {i}" for i in range(200)]
    shipped = body[:100] + ["HGMMA.64x64x16.F32 R, gdesc[R], RZ"] + body[100:]
    # A change far from the wgmma (appended code) moves nothing; one inside its window does.
    far = shipped + ["ATOMG.E.ADD.STRONG.GPU PT, R, desc[R][R.64], R"] * 10
    near = shipped[:90] + ["LOP3.LUT R, R, IMM, RZ, IMM, !PT"] + shipped[91:]
    window, moved, _ = sass_diff.hot_loop_drift(shipped, far)
    assert window == 2 * sass_diff.WINDOW and moved == 0
    _, moved, changes = sass_diff.hot_loop_drift(shipped, near)
    assert moved == 1 and changes and changes[0][0] == "replace"


def test_the_shipped_decode_does_not_drift_from_itself() -> None:
    from flashmla_backend.offline_compile import find_nvdisasm

    if find_nvdisasm() is None:
        pytest.skip("nvdisasm not installed: pip install nvidia-cuda-nvdisasm")
    shipped = sass_diff.normalised_sass(None)
    assert any("HGMMA" in line for line in shipped)
    assert sass_diff.hot_loop_drift(shipped, list(shipped))[1] == 0
