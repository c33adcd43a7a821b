"""The CPU side of ``benchmarks/read_ceiling.py``: every variant's kernel compiles for sm_90a
(NVRTC, no GPU) and reads through the engine its label names."""

from __future__ import annotations

import pytest

from flashmla_backend.offline_compile import disassemble, find_nvdisasm

from benchmark_scripts import load_benchmark_script


# SASS of the instruction each engine reads with.
ENGINE_SASS = {"loads": "LDG.E.NA.128", "bulk": "UBLKCP", "pages": "UBLKCP", "tiles": "UTMALDG.4D"}


@pytest.fixture(scope="module")
def probe():
    return load_benchmark_script("read_ceiling")


def compile_cubin(source: str, options: tuple[str, ...]) -> bytes:
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"read_ceiling.cu", 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    try:
        opts = [o.encode() for o in options] + [b"-ftz=true"]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")
        _, size = nvrtc.nvrtcGetCUBINSize(prog)
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


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
        cubin = compile_cubin(source, options)
        if nvdisasm is None:
            continue
        sass = disassemble(cubin)
        assert name in sass, variant.label
        assert ENGINE_SASS[variant.engine] in sass, f"{variant.label}: no {ENGINE_SASS[variant.engine]}"


def test_wrong_arch_fails_loudly(probe) -> None:
    source, _, options, _ = probe.kernel_source(probe.Variant("tiles", 1, stages=2))
    with pytest.raises(AssertionError, match="sm_90a"):
        compile_cubin(source, tuple(o.replace("sm_90a", "sm_90") for o in options))
