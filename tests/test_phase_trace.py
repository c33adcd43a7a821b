"""The decode's phase trace (CPU only): the script's event table mirrors the source's, the
summary arithmetic, and the traced build compiles (with the shipped build untouched)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from flashmla_backend.kernel_sources import assembled_source

from benchmark_scripts import load_benchmark_script


phase_trace = load_benchmark_script("phase_trace")


def _source_int(source: str, pattern: str) -> int:
    m = re.search(pattern, source)
    assert m, pattern
    return int(m.group(1))


def test_event_table_mirrors_the_source() -> None:
    source = assembled_source("mla_decode_shared.cuh")
    assert _source_int(source, r"constexpr int TRACE_MAX_CTAS = (\d+);") == phase_trace.TRACE_MAX_CTAS
    assert _source_int(source, r"constexpr int TRACE_EVENTS = (\d+);") == phase_trace.TRACE_EVENTS
    assert _source_int(source, r"constexpr int TRACE_PIECES = (\d+);") == phase_trace.TRACE_PIECES
    names = phase_trace.EVENT_NAMES
    assert len(names) == phase_trace.TRACE_EVENTS
    assert names[_source_int(source, r"EV_ENTRY = (\d+)")] == "entry"
    assert names[_source_int(source, r"EV_DEPENDENCY_DONE = (\d+)")] == "dependency wait done"
    assert names[_source_int(source, r"EV_MATH1_DONE = (\d+)")] == "warpgroup 1 done"
    assert names[_source_int(source, r"EV_FIRST_KV_ISSUED = (\d+)")] == "first KV issued"
    piece0 = _source_int(source, r"EV_PIECE0 = (\d+)")
    offsets = dict(re.findall(r"(PIECE_\w+) = (\d+)", source))
    assert names[piece0 + 4 * 1 + int(offsets["PIECE_PAGES_DONE"])] == "piece 1: pages done"
    assert names[piece0 + 4 * 2 + int(offsets["PIECE_STORED"])] == "piece 2: output stored"


def test_page_event_table_mirrors_the_source() -> None:
    source = assembled_source("mla_decode_shared.cuh")
    assert _source_int(source, r"constexpr int TRACE_PAGES = (\d+);") == phase_trace.TRACE_PAGES
    assert _source_int(source, r"PAGE_EVENTS = (\d+)") == len(phase_trace.PAGE_EVENT_NAMES)
    for name, index in (("PG_READY", phase_trace.READY), ("PG_SCORES_DONE", phase_trace.SCORES),
                        ("PG_P_STORED", phase_trace.P_STORED), ("PG_PV0_DONE", phase_trace.PV0),
                        ("PG_P_RECEIVED", phase_trace.P_RECEIVED), ("PG_PV1_DONE", phase_trace.PV1)):
        assert _source_int(source, rf"{name} = (\d+)") == index, name
    decode = assembled_source("mla_decode.cu")
    for name in ("PG_READY", "PG_SCORES_DONE", "PG_P_STORED", "PG_PV0_DONE", "PG_P_RECEIVED", "PG_PV1_DONE"):
        assert f", {name});" in decode, f"the decode never stamps {name}"


def test_page_anatomy_pairs_stamps_within_and_across_pages() -> None:
    table = np.zeros((phase_trace.TRACE_MAX_CTAS, phase_trace.TRACE_PAGES, len(phase_trace.PAGE_EVENT_NAMES)),
                     dtype=np.int64)
    for cta, period in ((0, 1000), (1, 3000)):  # two CTAs: pages every 1000 / 3000 cycles
        for page in range(3):  # three pages stamped, the rest not
            t0 = 10_000 + page * period
            table[cta, page] = (t0, t0 + 400, t0 + 700, t0 + 800, t0 + 750, t0 + 950)
    table[2, 0, 0] = 1  # past the grid's 2 CTAs: ignored
    out = phase_trace.page_anatomy(table, 2)
    assert out["scores (warpgroup 0)"] == (400.0, 6)
    assert out["softmax and P store (warpgroup 0)"] == (300.0, 6)
    assert out["P V (warpgroup 1)"] == (200.0, 6)
    assert out["page period (warpgroup 0)"] == (2000.0, 4)  # median of 1000, 1000, 3000, 3000
    assert out["wait for the next page (warpgroup 0)"] == (1200.0, 4)  # 200, 200, 2200, 2200
    assert phase_trace.page_anatomy(np.zeros_like(table), 2) == {}


def test_summary_is_relative_to_the_first_entry_and_skips_unstamped() -> None:
    table = np.zeros((phase_trace.TRACE_MAX_CTAS, phase_trace.TRACE_EVENTS), dtype=np.uint64)
    base = 10_000_000_000
    table[0, 0], table[1, 0], table[2, 0] = base + 1000, base, base + 3000  # entries at 1, 0, 3 µs
    table[0, 1], table[1, 1] = base + 5000, base + 7000                       # CTA 2 is idle
    table[5, 0] = base - 1_000_000  # past the grid's 3 CTAs: ignored
    out = phase_trace.summarize(table, 3)
    assert set(out) == {0, 1}
    assert out[0] == (3, 1.0, 3.0)
    assert out[1] == (2, 6.0, 7.0)
    assert phase_trace.summarize(np.zeros_like(table), 3) == {}


def test_traced_decode_compiles_and_reads_the_global_timer() -> None:
    import torch

    from flashmla_backend.kernel_sources import KernelModule, decode_module
    from flashmla_backend.offline_compile import compile_to_cubin, disassemble, find_nvdisasm

    if find_nvdisasm() is None:
        pytest.skip("nvdisasm not installed: pip install nvidia-cuda-nvdisasm")
    base = decode_module(torch.bfloat16, True)
    traced = KernelModule(base.source_file, base.entry_points, base.dtype, base.extra_defines + ("-DTRACE_PHASES=1",))
    cubin, log = compile_to_cubin(traced, traced.options + ("--ptxas-options=-v",))
    assert "0 bytes spill stores" in log, log
    text = disassemble(cubin)
    assert "SR_GLOBALTIMER" in text
    assert "SR_CLOCK" in text, "the page anatomy reads the SM cycle counter"
    assert "SR_GLOBALTIMER" not in disassemble(compile_to_cubin(base)[0]), "the shipped decode must not trace"
