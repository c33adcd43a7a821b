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


# 128 requests of 4096 keys: one part per request, nothing split, so every combine CTA is idle;
# and a batch where only the long request splits.
ORDERING_SHAPES = [([4096] * 128, 1, 16), ([30000] + [64] * 40, 1, 64)]


def output_seen_by_next_kernel(lengths: list[int], s_q: int, h_q: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """``(relative error, lse, reference lse)`` of what the stream's next kernels see: ``out`` and
    ``lse`` copied right after the call, with no host sync in between, against the reference,
    under the environment's settings."""
    from conftest import relative_error
    from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata
    from flashmla_backend.reference import mla_decode_reference

    p = make_problem(lengths, s_q, h_q, seed=len(lengths))
    b, s_q, h_q, h_k = p.shape
    md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
    flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns, causal=p.causal)  # compiled
    torch.cuda.synchronize()
    out = torch.full((b, s_q, h_q, 512), float("nan"), dtype=p.q.dtype, device="cuda")
    _, lse = flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns, causal=p.causal,
                                    out=out, check_contents=False)
    out_seen, lse_seen = out.clone(), lse.clone()  # the stream's next kernels
    torch.cuda.synchronize()
    ref, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, causal=p.causal)
    return relative_error(out_seen, ref.float()), lse_seen, ref_lse


@requires_hopper
@pytest.mark.parametrize("combine_defines", ["", "-DIDLE_CTAS_SKIP_WAIT=0"], ids=["shipped", "every_cta_waits"])
@pytest.mark.parametrize(("lengths", "s_q", "h_q"), ORDERING_SHAPES, ids=["nothing_split", "one_split"])
def test_next_kernel_on_the_stream_sees_the_whole_output(monkeypatch: pytest.MonkeyPatch, combine_defines: str,
                                                         lengths: list[int], s_q: int, h_q: int) -> None:
    """The stream's next kernel must see the whole output, not only what the combine wrote.
    With the combine's idle CTAs exiting before the decode ends (``IDLE_CTAS_SKIP_WAIT``, shipped)
    and without. Run 33 (H100): with no combine CTA waiting at all (the diagnostic value 2) the
    copy still saw the whole output, so a plain launch is ordered after the decode by the stream
    itself; this test guards the API's promise, not CTA (0, 0)'s wait."""
    from conftest import assert_lse_close

    monkeypatch.setenv("FLASHMLA_BACKEND_COMBINE_DEFINES", combine_defines)
    err, lse_seen, ref_lse = output_seen_by_next_kernel(lengths, s_q, h_q)
    assert err < 1e-2, f"the next kernel read the output before the decode wrote it (relative error {err:.3e})"
    assert_lse_close(lse_seen, ref_lse)
