"""The CPU side of ``benchmarks/read_ceiling.py``: every variant's kernel compiles for sm_90a
(NVRTC, no GPU) and reads through the engine its label names."""

from __future__ import annotations

import pytest

from flashmla_backend.offline_compile import OfflineCompileError, compile_source, disassemble, find_nvdisasm

from benchmark_scripts import load_benchmark_script


# SASS of the instruction each engine reads with.
ENGINE_SASS = {"loads": "LDG.E.NA.128", "bulk": "UBLKCP", "pages": "UBLKCP", "tiles": "UTMALDG.4D"}


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
