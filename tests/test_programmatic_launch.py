"""Programmatic dependent launches (on by default; ``FLASHMLA_BACKEND_PDL=0`` turns them off):
the decode behind the stream's previous kernel and the combine behind the decode, each waiting
for its predecessor's results itself. Module variants on CPU; on a Hopper GPU, the plain
launches (the rest of the GPU suite runs the default) equal to the reference for split-heavy
shapes and under CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_hopper
from flashmla_backend.kernel_sources import combine_module, decode_module
from flashmla_backend.settings import PROGRAMMATIC_LAUNCH_ENV, settings
from flashmla_backend.testing import make_problem


def test_switch_and_module_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROGRAMMATIC_LAUNCH_ENV, raising=False)
    assert settings().programmatic_launch
    monkeypatch.setenv(PROGRAMMATIC_LAUNCH_ENV, "0")
    assert not settings().programmatic_launch
    assert "-DMLA_PROGRAMMATIC_LAUNCH" in combine_module(torch.bfloat16, programmatic=True).options
    assert "-DMLA_PROGRAMMATIC_LAUNCH" not in combine_module(torch.bfloat16).options
    assert "-DMLA_PROGRAMMATIC_LAUNCH" in decode_module(torch.float16, programmatic=True).options
    assert "-DMLA_PROGRAMMATIC_LAUNCH" not in decode_module(torch.float16).options


@requires_hopper
@pytest.mark.parametrize(("lengths", "s_q", "h_q", "dtype"), [
    ([8192], 1, 16, torch.bfloat16),           # one request over every SM: 100+ splits
    ([2048] * 8, 1, 128, torch.bfloat16),      # the b = 8 latency shape
    ([1, 0, 5000, 300], 2, 16, torch.float16),  # empty and short requests beside a split one
])
def test_plain_launches_match_reference(monkeypatch: pytest.MonkeyPatch, lengths: list[int], s_q: int,
                                                h_q: int, dtype: torch.dtype) -> None:
    from test_gpu_decode import run_and_check

    monkeypatch.setenv(PROGRAMMATIC_LAUNCH_ENV, "0")
    run_and_check(make_problem(lengths, s_q, h_q, dtype=dtype, seed=len(lengths)), dtype)


@requires_hopper
def test_plain_launches_under_graph_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_gpu_decode import test_cuda_graph_replay_with_new_lengths

    monkeypatch.setenv(PROGRAMMATIC_LAUNCH_ENV, "0")
    test_cuda_graph_replay_with_new_lengths()
