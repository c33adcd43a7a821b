"""Where the time of a small decode call goes (GPU machine): each kernel's GPU duration and the
idle gaps between them, for our call and each peer's, from the CUDA activity trace.

    python benchmarks/latency_anatomy.py [--rows latency] [--iters 20] [--out DIR]

For each anchor row whose label contains ``--rows``, every implementation runs ``--iters``
times after an L2 flush (as the benchmark times it); the trace (torch.profiler, which records
CuPy's launches too) is cut at the flush kernels. Per implementation it prints the median
duration of each kernel it launched, the median sum of those durations, and the median span
from the first kernel's start to the last kernel's end: span minus sum is time the GPU sat
between the call's own kernels. "ours" reuses the schedule like the peers; "ours+schedule" also
runs ``get_mla_metadata`` (the issue's whole-call figure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata, precompile
from flashmla_backend.bench import ANCHOR_CASES, HEAD_QK, HEAD_V, build_problem, load_peers


def trace_kernels(fn: Callable[[], object], iters: int, flush: torch.Tensor, trace_path: Path) -> list[list[dict]]:
    """Runs ``flush.zero_(); fn()`` iters times under the profiler; returns the kernels of each
    call (name, ts, dur in µs)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        flush.zero_()
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace_path))
    return split_calls(json.loads(trace_path.read_text())["traceEvents"])


def is_flush(kernel: dict) -> bool:
    """The L2 flush (a 1 GiB fill) is the only kernel of hundreds of µs; it starts each call."""
    name = kernel["name"].lower()
    return kernel["dur"] > 100.0 and ("fill" in name or "elementwise" in name)


def split_calls(trace_events: list[dict]) -> list[list[dict]]:
    """Kernel events of a chrome trace, in time order, cut into calls at the flush kernels
    (which are dropped, as is anything before the first flush)."""
    kernels = sorted((e for e in trace_events if e.get("ph") == "X" and e.get("cat") == "kernel"),
                     key=lambda e: e["ts"])
    calls: list[list[dict]] = []
    for k in kernels:
        if is_flush(k):
            calls.append([])
        elif calls:
            calls[-1].append({"name": k["name"], "ts": k["ts"], "dur": k["dur"]})
    return [c for c in calls if c]


def summarize(calls: list[list[dict]]) -> dict:
    """Median per-kernel durations, median busy sum and median span of the calls."""
    per_kernel: dict[str, list[float]] = defaultdict(list)
    for c in calls:
        for k in c:
            per_kernel[k["name"][:60]].append(k["dur"])
    busy = [sum(k["dur"] for k in c) for c in calls]
    span = [c[-1]["ts"] + c[-1]["dur"] - c[0]["ts"] for c in calls]
    return {"kernels": {n: statistics.median(v) for n, v in per_kernel.items()},
            "busy_us": statistics.median(busy), "span_us": statistics.median(span),
            "kernels_per_call": statistics.median(len(c) for c in calls)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="latency", help="anchor rows whose label contains this text")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench_out/latency_anatomy"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("latency_anatomy: no CUDA GPU here; it runs on an H100/H200.")
        return 0
    precompile()
    args.out.mkdir(parents=True, exist_ok=True)
    flush = torch.empty((1 << 30) // 4, dtype=torch.float32, device="cuda")
    peers = load_peers()
    report = {"card": torch.cuda.get_device_name(), "rows": {}}
    for case in (c for c in ANCHOR_CASES if args.rows in c.label):
        p = build_problem(case)
        b, s_q, h_q, h_k = p.shape
        scale = HEAD_QK ** -0.5
        md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
        calls: dict[str, Callable[[], object]] = {
            "ours": lambda: flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, HEAD_V,
                                                   md, ns, softmax_scale=scale, causal=True),
            "ours+schedule": lambda: flash_mla_with_kvcache(
                p.q, p.k_cache, p.block_table, p.cache_seqlens, HEAD_V,
                *get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k), softmax_scale=scale, causal=True),
        }
        for name, make in peers.items():
            call = make(p, scale)
            if call is not None:
                calls[name] = call
        print(f"## {case.label} ({report['card']}): µs, medians of {args.iters} calls")
        print("| implementation | kernels per call | GPU busy | span | idle between kernels | kernels (median µs) |")
        print("|---|---|---|---|---|---|")
        row = {}
        for name, fn in calls.items():
            trace = args.out / f"{case.label.replace(' ', '').replace(':', '_').replace(',', '_')}_{name}.json"
            s = summarize(trace_kernels(fn, args.iters, flush, trace))
            row[name] = s
            kernels = "; ".join(f"{n} {d:.1f}" for n, d in s["kernels"].items())
            print(f"| {name} | {s['kernels_per_call']:.0f} | {s['busy_us']:.1f} | {s['span_us']:.1f} | "
                  f"{s['span_us'] - s['busy_us']:.1f} | {kernels} |")
        report["rows"][case.label] = row
        print()
    (args.out / "anatomy.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
