"""Where a decode CTA's time goes (GPU machine), from the decode's own phase trace.

    python benchmarks/phase_trace.py [--rows latency] [--iters 20] [--whole-call] [--out DIR]

The decode built with ``-DTRACE_PHASES=1`` stamps the GPU's global nanosecond timer at fixed
events (``TraceEvent`` in ``kernels/mla_decode_shared.cuh``): kernel entry, the end of the grid
dependency wait, the producer's first page issue, and per piece of warpgroup 0 (its first three
pieces with pages) Q ready, first page ready, pages done, output stored; warpgroup 1's last
store. Each anchor row whose label contains ``--rows`` runs ``--iters`` times after an L2 flush,
as the benchmark times it (``--whole-call`` adds ``get_mla_metadata`` before each call, whose
kernel the decode then waits for). Per event it prints how many CTAs stamped it and, as medians
over the calls, the median CTA's and the slowest CTA's time since the first CTA entered.
The TMA producer stamps its event; the cp.async one does not. ``--pages`` adds the page
anatomy: for the first ``TRACE_PAGES`` pages of each CTA's first piece, thread 0 of each math
warpgroup stamps the SM's cycle counter (page ready, scores done, P stored, its P V done; P
received, P V done), and the script prints each phase's median length in cycles over CTAs,
pages and calls. Timing-only: the trace's stores change the kernel slightly, so compare
phases, not totals, with the benchmark.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata
from flashmla_backend.bench import ANCHOR_CASES, HEAD_QK, HEAD_V, build_problem
from flashmla_backend.kernel_sources import decode_module
from flashmla_backend.runtime import module_global
from flashmla_backend.settings import reload_settings, settings

#: Mirror of the source's trace table (tests/test_phase_trace.py checks it against the source).
TRACE_MAX_CTAS = 1024
TRACE_EVENTS = 16
TRACE_PIECES = 3
PIECE_EVENTS = ("Q ready", "first page ready", "pages done", "output stored")
EVENT_NAMES = (["entry", "dependency wait done"]
               + [f"piece {p}: {what}" for p in range(TRACE_PIECES) for what in PIECE_EVENTS]
               + ["warpgroup 1 done", "first KV issued"])
#: The page anatomy's table ``g_page_trace[TRACE_MAX_CTAS][TRACE_PAGES][PAGE_EVENTS]`` (clock64).
TRACE_PAGES = 8
PAGE_EVENT_NAMES = ("page ready", "scores done", "P stored", "P V0 done", "P received", "P V1 done")
READY, SCORES, P_STORED, PV0, P_RECEIVED, PV1 = range(len(PAGE_EVENT_NAMES))
#: phase: (start event, end event, end's page offset)
PAGE_PHASES = {
    "scores (warpgroup 0)": (READY, SCORES, 0),
    "softmax and P store (warpgroup 0)": (SCORES, P_STORED, 0),
    "rest of P V (warpgroup 0)": (P_STORED, PV0, 0),
    "wait for the next page (warpgroup 0)": (PV0, READY, 1),
    "page period (warpgroup 0)": (READY, READY, 1),
    "P stored to P received": (P_STORED, P_RECEIVED, 0),
    "P V (warpgroup 1)": (P_RECEIVED, PV1, 0),
    "idle until the next P (warpgroup 1)": (PV1, P_RECEIVED, 1),
}


def summarize(table: np.ndarray, ctas: int) -> dict[int, tuple[int, float, float]]:
    """Per event with stamps: (CTAs that stamped it, median CTA µs, slowest CTA µs) since the
    earliest entry among the grid's ``ctas`` rows of ``table`` (uint64 ns, 0 = not stamped)."""
    rows = table[:ctas].astype(np.int64)
    entries = rows[:, 0][rows[:, 0] > 0]
    if entries.size == 0:
        return {}
    t0 = entries.min()
    out = {}
    for event in range(TRACE_EVENTS):
        stamped = rows[:, event][rows[:, event] > 0]
        if stamped.size:
            us = (stamped - t0) / 1e3
            out[event] = (int(stamped.size), float(np.median(us)), float(us.max()))
    return out


def page_anatomy(table: np.ndarray, ctas: int) -> dict[str, tuple[float, int]]:
    """Per phase of ``PAGE_PHASES``: (median cycles, pages measured) over the grid's ``ctas``
    rows of ``table`` (int64 ``[TRACE_MAX_CTAS, TRACE_PAGES, PAGE_EVENTS]`` clock64 stamps, 0 =
    not stamped); a page counts where both its stamps exist."""
    rows = table[:ctas].astype(np.int64)
    out = {}
    for name, (start, end, shift) in PAGE_PHASES.items():
        a = rows[:, :TRACE_PAGES - shift, start]
        b = rows[:, shift:, end]
        both = (a > 0) & (b > 0)
        if both.any():
            out[name] = (float(np.median((b - a)[both])), int(both.sum()))
    return out


def trace_row(case, iters: int, whole_call: bool, flush: torch.Tensor
              ) -> tuple[dict[int, tuple[int, float, float]], dict[str, tuple[float, int]]]:
    """(phase events as ``summarize`` gives them, page anatomy as ``page_anatomy`` gives it), each
    the median over ``iters`` calls."""
    from cupy.cuda import runtime

    p = build_problem(case)
    b, s_q, h_q, h_k = p.shape
    scale = HEAD_QK ** -0.5
    md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
    index = p.q.device.index or 0
    module = decode_module(p.q.dtype, settings().programmatic_launch)
    address = module_global(module, "mla_decode", index, "g_phase_trace")
    host = np.zeros((TRACE_MAX_CTAS, TRACE_EVENTS), dtype=np.uint64)
    page_address = module_global(module, "mla_decode", index, "g_page_trace")
    page_host = np.zeros((TRACE_MAX_CTAS, TRACE_PAGES, len(PAGE_EVENT_NAMES)), dtype=np.int64)
    m_blocks = -(-(s_q * h_q // h_k) // 64)
    ctas = min(m_blocks * h_k * md.shape[0], TRACE_MAX_CTAS)
    per_call: list[dict[int, tuple[int, float, float]]] = []
    pages_per_call: list[dict[str, tuple[float, int]]] = []
    for i in range(iters + 3):
        torch.cuda.synchronize()
        runtime.memset(address, 0, host.nbytes)
        runtime.memset(page_address, 0, page_host.nbytes)
        flush.zero_()
        if whole_call:
            md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
        flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, HEAD_V, md, ns,
                               softmax_scale=scale, causal=p.causal)
        torch.cuda.synchronize()
        runtime.memcpy(host.ctypes.data, address, host.nbytes, runtime.memcpyDeviceToHost)
        runtime.memcpy(page_host.ctypes.data, page_address, page_host.nbytes, runtime.memcpyDeviceToHost)
        if i >= 3:  # warm-up calls compile and settle
            per_call.append(summarize(host, ctas))
            pages_per_call.append(page_anatomy(page_host, ctas))
    result = {}
    for event in range(TRACE_EVENTS):
        rows = [c[event] for c in per_call if event in c]
        if rows:
            result[event] = (int(statistics.median(r[0] for r in rows)), statistics.median(r[1] for r in rows),
                             statistics.median(r[2] for r in rows))
    pages = {}
    for name in PAGE_PHASES:
        rows = [c[name] for c in pages_per_call if name in c]
        if rows:
            pages[name] = (statistics.median(r[0] for r in rows), int(statistics.median(r[1] for r in rows)))
    return result, pages


def format_trace(label: str, card: str, ctas_total: int, result: dict[int, tuple[int, float, float]]) -> str:
    lines = [f"## {label} ({card}): µs since the first CTA entered, medians over calls; {ctas_total} CTAs",
             "| event | CTAs | median CTA | slowest CTA |", "|---|---|---|---|"]
    for event, (count, median, slowest) in sorted(result.items(), key=lambda kv: kv[1][1]):
        lines.append(f"| {EVENT_NAMES[event]} | {count} | {median:.2f} | {slowest:.2f} |")
    return "\n".join(lines)


def format_pages(label: str, card: str, pages: dict[str, tuple[float, int]]) -> str:
    lines = [f"## {label} ({card}): page anatomy, SM cycles, medians over CTAs, pages and calls",
             "| phase | cycles | pages per call |", "|---|---|---|"]
    lines += [f"| {name} | {cycles:.0f} | {count} |" for name, (cycles, count) in pages.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="latency", help="anchor rows whose label contains this text")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--whole-call", action="store_true", help="get_mla_metadata before each call")
    ap.add_argument("--pages", action="store_true", help="also print the page anatomy (cycles)")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables to DIR/phase_trace.md")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("phase_trace.py: no CUDA GPU here; it runs on the H100/H200 device machine.")
        return 0
    # The trace is a compile-time knob of the decode: this process's decode is the traced build.
    os.environ["FLASHMLA_BACKEND_DECODE_DEFINES"] = (
        os.environ.get("FLASHMLA_BACKEND_DECODE_DEFINES", "") + " -DTRACE_PHASES=1").strip()
    reload_settings()
    card = torch.cuda.get_device_name()
    flush = torch.empty((1 << 30) // 4, dtype=torch.float32, device="cuda")
    tables = []
    for case in ANCHOR_CASES:
        if args.rows not in case.label:
            continue
        result, pages = trace_row(case, args.iters, args.whole_call, flush)
        ctas = max((c for c, _, _ in result.values()), default=0)
        tables.append(format_trace(case.label, card, ctas, result))
        print(tables[-1], "\n", flush=True)
        if args.pages:
            tables.append(format_pages(case.label, card, pages))
            print(tables[-1], "\n", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "phase_trace.md").write_text("\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
