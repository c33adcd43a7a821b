"""Clocks and power under a sustained load: our decode, the peers' and a bf16 matmul, each run
back to back for a few seconds while ``nvidia-smi`` samples the SM clock, power and the clock
event (throttle) reasons every 100 ms (GPU machine).

    python benchmarks/clock_probe.py [--seconds 6] [--rows compute memory | anchors | 8x1x128x2048 ...] [--out DIR]

Rows are the benchmark's anchor rows by ``b x s_q x h_q x s_k`` (``v`` appended for varlen),
``anchors`` for all but the latency rows (host-bound back to back), or the aliases ``compute``
(128x1x128x4096) and ``memory`` (32x1x16x32768). Besides the per-workload table it writes a
sustained table: per row, each kernel's µs per call back to back (the median of the rounds) and
ours ÷ the best peer, the counterpart of the bench's burst table.

Questions it answers (NOTES.md, "Run 16"): at what SM clock and power does each kernel run on
this card under sustained load (an H200 sits at its 700 W cap on every row), and how do the
kernels rank there? Times are steady-state GPU times (CUDA events around batches of 20 calls,
no L2 flush); compare them only with other workloads of the same run.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata
from flashmla_backend.bench import ANCHOR_CASES, HEAD_QK, HEAD_V, Case, build_problem, load_peers


def row_id(case: Case) -> str:
    """``b x s_q x h_q x s_k``, with ``v`` for a varlen row: 128x1x16x4096v."""
    return f"{case.batch}x{case.s_q}x{case.h_q}x{case.s_k}" + ("v" if case.varlen else "")


ROWS = {row_id(c): c for c in ANCHOR_CASES}
# The latency rows are left out of "anchors": back to back, an eager call's host time (~100 µs)
# exceeds their GPU time (~20-30 µs), so the GPU would idle between calls.
ALIASES = {"compute": ["128x1x128x4096"], "memory": ["32x1x16x32768"],
           "anchors": [row_id(c) for c in ANCHOR_CASES if c.regime != "latency"]}
PEER_NAMES = ("FA3-MLA", "FlashMLA", "Triton MLA")


def resolve_rows(names: list[str]) -> list[str]:
    """Row ids for ``--rows``; an unknown name raises ValueError listing the known ones."""
    ids: list[str] = []
    for name in names:
        if name not in ALIASES and name not in ROWS:
            raise ValueError(f"--rows: unknown row {name!r}; expected one of {sorted(ALIASES) + list(ROWS)}")
        ids += [r for r in ALIASES.get(name, [name]) if r not in ids]
    return ids


def sustained_table(per_call: dict[tuple[str, str], list[float]], rows: list[str], kernels: list[str]) -> list[str]:
    """Markdown rows: per row, each kernel's median µs per call over its rounds, and ours ÷ the
    best peer (best peer time / ours: > 1 means ours is faster)."""
    lines = ["| row | " + " | ".join(kernels) + " | ours / best peer |", "|---" * (len(kernels) + 2) + "|"]
    for row in rows:
        us = {k: statistics.median(per_call[(row, k)]) for k in kernels if per_call.get((row, k))}
        peers = [v for k, v in us.items() if k != "ours"]
        ratio = f"{min(peers) / us['ours']:.2f}x" if peers and "ours" in us else "n/a"
        lines.append(f"| {row} | " + " | ".join(f"{us[k]:.1f}" if k in us else "n/a" for k in kernels) + f" | {ratio} |")
    return lines


QUERY_FIELDS = ["clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "clocks_event_reasons.active"]


@lru_cache(maxsize=1)
def query_fields() -> list[str]:
    """QUERY_FIELDS, with the reasons under their pre-2023 name where nvidia-smi lacks the new one."""
    probe = subprocess.run(["nvidia-smi", f"--query-gpu={QUERY_FIELDS[-1]}", "--format=csv"], capture_output=True)
    return QUERY_FIELDS if probe.returncode == 0 else QUERY_FIELDS[:-1] + ["clocks_throttle_reasons.active"]


def start_sampler(path: Path) -> subprocess.Popen:
    """nvidia-smi writing one CSV line per 100 ms to ``path`` until terminated."""
    return subprocess.Popen(["nvidia-smi", "--query-gpu=" + ",".join(query_fields()), "--format=csv,noheader,nounits",
                             "-lms", "100", "-i", str(torch.cuda.current_device())],
                            stdout=path.open("w"), stderr=subprocess.STDOUT)


def run_for(call: Callable[[], object], seconds: float, batch: int = 20) -> tuple[int, float]:
    """Calls ``call`` back to back for about ``seconds``; returns (calls, GPU µs per call), from
    CUDA events around each batch of ``batch`` calls."""
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    calls, gpu_ms, start = 0, 0.0, time.perf_counter()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while time.perf_counter() - start < seconds:
        begin.record()
        for _ in range(batch):
            call()
        end.record()
        end.synchronize()
        gpu_ms += begin.elapsed_time(end)
        calls += batch
    return calls, 1e3 * gpu_ms / calls


def summarize(path: Path) -> dict[str, object]:
    """Median SM / memory clock (MHz), median and max power (W), max temperature and the set of
    clock event reasons seen, over the samples after the first second."""
    rows = [line.split(", ") for line in path.read_text().splitlines() if line.count(",") >= 4]
    rows = rows[10:] or rows
    def num(i: int) -> list[float]:
        return [float(r[i]) for r in rows if r[i].replace(".", "", 1).isdigit()]
    return {"samples": len(rows), "sm_mhz": statistics.median(num(0)) if num(0) else float("nan"),
            "mem_mhz": statistics.median(num(1)) if num(1) else float("nan"),
            "power_w": statistics.median(num(2)) if num(2) else float("nan"),
            "max_power_w": max(num(2), default=float("nan")), "max_temp_c": max(num(3), default=float("nan")),
            "reasons": sorted({r[4].strip() for r in rows})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rows", nargs="+", default=["compute", "memory"],
                    help=f"row ids ({', '.join(ROWS)}) or {sorted(ALIASES)}")
    ap.add_argument("--out", type=Path, default=Path("/tmp/clock_probe"))
    args = ap.parse_args(argv)
    try:
        rows = resolve_rows(args.rows)
    except ValueError as exc:
        ap.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.cuda.init()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    # (row id or "", kernel, call); the matmul has no row.
    workloads: list[tuple[str, str, Callable[[], object]]] = [("", "matmul 8192^3 bf16", lambda: a @ bm)]
    peers = load_peers()
    for row in rows:
        p = build_problem(ROWS[row])
        b, s_q, h_q, h_k = p.shape
        scale = HEAD_QK ** -0.5
        md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
        workloads.append((row, "ours", lambda p=p, md=md, ns=ns, scale=scale: flash_mla_with_kvcache(
            p.q, p.k_cache, p.block_table, p.cache_seqlens, HEAD_V, md, ns, softmax_scale=scale, causal=True)))
        for name in PEER_NAMES:
            if name not in peers:
                continue
            try:
                call = peers[name](p, scale)
            except Exception as exc:  # a peer that rejects a shape is reported, not fatal
                print(f"# {name} failed to set up {row}: {exc}", file=sys.stderr)
                continue
            if call is not None:
                workloads.append((row, name, call))
    per_call: dict[tuple[str, str], list[float]] = {}
    # Each workload twice, interleaved, so that drift (heating) shows as a difference between runs.
    lines = ["| workload | run | µs per call (hot) | SM MHz | mem MHz | power W (median / max) | max °C | clock event reasons |",
             "|---|---|---|---|---|---|---|---|"]
    for run in (1, 2):
        for row, kernel, call in workloads:
            name = f"{kernel} {ROWS[row].label}" if row else kernel
            log = args.out / f"{re.sub(r'[^A-Za-z0-9.-]+', '_', name)}_run{run}.csv"
            sampler = start_sampler(log)
            try:
                _, us = run_for(call, args.seconds)
            finally:
                sampler.terminate()
                sampler.wait()
            if row:
                per_call.setdefault((row, kernel), []).append(us)
            s = summarize(log)
            lines.append(f"| {name} | {run} | {us:.1f} | {s['sm_mhz']:.0f} | {s['mem_mhz']:.0f} | "
                         f"{s['power_w']:.0f} / {s['max_power_w']:.0f} | {s['max_temp_c']:.0f} | {' '.join(s['reasons'])} |")
            print(lines[-1], flush=True)
    card = torch.cuda.get_device_name()
    kernels = ["ours"] + [k for k in PEER_NAMES if any(key[1] == k for key in per_call)]
    table = "\n".join([f"## Clocks under load: {card}", ""] + lines + [
        "", f"## Sustained: µs per call back to back, median of the rounds ({card})", ""] +
        sustained_table(per_call, rows, kernels))
    (args.out / "clocks.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
