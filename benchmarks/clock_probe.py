"""Clocks and power under a sustained load: our decode, the peers' and a bf16 matmul, each run
back to back for a few seconds while ``nvidia-smi`` samples the SM clock, power and the clock
event (throttle) reasons every 100 ms (GPU machine).

    python benchmarks/clock_probe.py [--seconds 6] [--rows compute,memory] [--out DIR]

Question it answers (NOTES.md, "card-to-card spread"): on a given H200, does our kernel run at a
lower SM clock than FA3-MLA's on the same problem, so that the two cards' ratios differ? Times
here are steady-state (no L2 flush, calls back to back): only the clocks and the ratios between
workloads on this card are meant to be read.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata
from flashmla_backend.bench import HEAD_QK, HEAD_V, Case, build_problem, load_peers

ROWS = {"compute": Case("compute", 128, 1, 128, 4096), "memory": Case("memory", 32, 1, 16, 32768)}
QUERY_FIELDS = ["clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "clocks_event_reasons.active"]


def query_fields() -> list[str]:
    """QUERY_FIELDS, with the reasons under their pre-2023 name where nvidia-smi lacks the new one."""
    probe = subprocess.run(["nvidia-smi", f"--query-gpu={QUERY_FIELDS[-1]}", "--format=csv"], capture_output=True)
    return QUERY_FIELDS if probe.returncode == 0 else QUERY_FIELDS[:-1] + ["clocks_throttle_reasons.active"]


def start_sampler(path: Path) -> subprocess.Popen:
    """nvidia-smi writing one CSV line per 100 ms to ``path`` until terminated."""
    return subprocess.Popen(["nvidia-smi", "--query-gpu=" + ",".join(query_fields()), "--format=csv,noheader,nounits",
                             "-lms", "100", "-i", str(torch.cuda.current_device())],
                            stdout=path.open("w"), stderr=subprocess.STDOUT)


def run_for(call: Callable[[], object], seconds: float) -> tuple[int, float]:
    """Calls ``call`` back to back for about ``seconds``; returns (calls, µs per call)."""
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            call()
        calls += 20
        torch.cuda.synchronize()
    return calls, 1e6 * (time.perf_counter() - start) / calls


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
    ap.add_argument("--rows", default="compute,memory", help=f"comma-separated of {sorted(ROWS)}")
    ap.add_argument("--out", type=Path, default=Path("/tmp/clock_probe"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.cuda.init()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    workloads: list[tuple[str, Callable[[], object]]] = [("matmul 8192^3 bf16", lambda: a @ bm)]
    peers = load_peers()
    for row in args.rows.split(","):
        p = build_problem(ROWS[row])
        b, s_q, h_q, h_k = p.shape
        scale = HEAD_QK ** -0.5
        md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
        workloads.append((f"ours {ROWS[row].label}", lambda p=p, md=md, ns=ns, scale=scale: flash_mla_with_kvcache(
            p.q, p.k_cache, p.block_table, p.cache_seqlens, HEAD_V, md, ns, softmax_scale=scale, causal=True)))
        for name in ("FA3-MLA", "FlashMLA"):
            if name in peers:
                workloads.append((f"{name} {ROWS[row].label}", peers[name](p, scale)))
    # Each workload twice, interleaved, so that drift (heating) shows as a difference between runs.
    lines = ["| workload | run | µs per call (hot) | SM MHz | mem MHz | power W (median / max) | max °C | clock event reasons |",
             "|---|---|---|---|---|---|---|---|"]
    for run in (1, 2):
        for name, call in workloads:
            log = args.out / f"{re.sub(r'[^A-Za-z0-9.-]+', '_', name)}_run{run}.csv"
            sampler = start_sampler(log)
            try:
                _, us = run_for(call, args.seconds)
            finally:
                sampler.terminate()
                sampler.wait()
            s = summarize(log)
            lines.append(f"| {name} | {run} | {us:.1f} | {s['sm_mhz']:.0f} | {s['mem_mhz']:.0f} | "
                         f"{s['power_w']:.0f} / {s['max_power_w']:.0f} | {s['max_temp_c']:.0f} | {' '.join(s['reasons'])} |")
            print(lines[-1], flush=True)
    table = "\n".join([f"## Clocks under load: {torch.cuda.get_device_name()}", ""] + lines)
    (args.out / "clocks.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
