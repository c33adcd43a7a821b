"""The CPU side of ``benchmarks/read_ceiling.py``: every variant's kernel compiles for sm_90a
(NVRTC, no GPU) and reads through the engine its label names."""

from __future__ import annotations

import pytest
import torch

from flashmla_backend.offline_compile import OfflineCompileError, compile_source, disassemble, find_nvdisasm

from benchmark_scripts import load_benchmark_script
from conftest import requires_hopper


# SASS of the instruction each engine reads with.
ENGINE_SASS = {"loads": "LDG.E.NA.128", "bulk": "UBLKCP", "pages": "UBLKCP", "tiles": "UTMALDG.4D",
               "groups": "UTMALDG.5D", "halfgroups": "UTMALDG.5D"}


@pytest.fixture(scope="module")
def probe():
    return load_benchmark_script("read_ceiling")


def test_labels_are_unique(probe) -> None:
    labels = [v.label for v in probe.VARIANTS]
    assert len(labels) == len(set(labels))
    assert {v.engine for v in probe.VARIANTS} == set(ENGINE_SASS)


def test_ring_fits_in_shared_memory(probe) -> None:
    for variant in probe.VARIANTS:
        _, _, _, shared = probe.kernel_source(variant)
        assert shared * variant.ctas_per_sm <= 227 * 1024, variant.label


def test_every_variant_compiles_and_reads_by_its_engine(probe) -> None:
    nvdisasm = find_nvdisasm()
    for variant in probe.VARIANTS:
        source, name, options, _ = probe.kernel_source(variant)
        cubin, log = compile_source(source, "read_ceiling.cu", options)
        assert "warning" not in log.lower(), f"{variant.label}: {log}"
        if nvdisasm is None:
            continue
        sass = disassemble(cubin)
        assert name in sass, variant.label
        assert ENGINE_SASS[variant.engine] in sass, f"{variant.label}: no {ENGINE_SASS[variant.engine]}"


def test_wrong_arch_fails_loudly(probe) -> None:
    source, _, options, _ = probe.kernel_source(probe.Variant("tiles", 1, stages=2))
    with pytest.raises(OfflineCompileError, match="sm_90a"):
        compile_source(source, "read_ceiling.cu", tuple(o.replace("sm_90a", "sm_90") for o in options))


@requires_hopper
@pytest.mark.parametrize("boxes_per_page", [1, 2])
def test_group_major_box_lands_in_the_swizzled_group_major_layout(probe, boxes_per_page: int) -> None:
    # The group-major map (tensor_map.kv_cache_group_major_map): one box is a page (or half of
    # one), its smem image the atoms of (token group, chunk) at (9 group + chunk) KB, 128B-swizzled.
    import cupy as cp
    import numpy as np

    from flashmla_backend.tensor_map import kv_cache_group_major_map

    cache = torch.randn(5, 64, 1, 576, device="cuda").to(torch.bfloat16)
    tensor_map = torch.frombuffer(bytearray(kv_cache_group_major_map(cache, boxes_per_page)), dtype=torch.uint8).cuda()
    image = torch.full((64 * 576,), float("nan"), device="cuda").to(torch.bfloat16)
    kernel = cp.RawModule(code=probe.GROUP_IMAGE_SOURCE, options=("-arch=sm_90a", "-std=c++17")).get_function(
        "group_box_image")
    kernel.max_dynamic_shared_size_bytes = probe.PAGE_BYTES
    page = 3
    kernel((1,), (256,), (tensor_map.data_ptr(), np.int32(page), np.int32(8 // boxes_per_page), image.data_ptr()),
           shared_mem=probe.PAGE_BYTES)
    torch.cuda.synchronize()
    offsets = torch.tensor([[probe.group_major_offset(t, c) for c in range(576)] for t in range(64)])
    assert torch.equal(offsets.flatten().sort().values, torch.arange(0, probe.PAGE_BYTES, 2))
    expected = torch.empty_like(image)
    expected[(offsets // 2).flatten().cuda()] = cache[page, :, 0, :].flatten()
    assert torch.equal(image.view(torch.int16), expected.view(torch.int16))


def test_group_image_kernel_compiles(probe) -> None:
    _, log = compile_source(probe.GROUP_IMAGE_SOURCE, "group_image.cu", ("-arch=sm_90a", "-std=c++17"))
    assert "warning" not in log.lower(), log
