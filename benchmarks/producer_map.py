"""Where the cp.async KV producer beats TMA, by pages per scheduler part (GPU machine).

    python benchmarks/producer_map.py [--out producer_map.md]

For batches of equal lengths at h_q = 16, s_q = 1 (one query block, where either producer may
run), times our decode + combine loading by TMA, by cp.async, and by the automatic rule
(``flashmla_backend/kv_producer.py``), and prints the scheduler parts' page counts beside the
times: does cp.async pay where parts are short (NOTES.md, "Producer map")?
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata
from flashmla_backend.bench import HEAD_QK, HEAD_V, Case, Timer, build_problem
from flashmla_backend.settings import KV_PRODUCER_ENV, reload_settings
from flashmla_backend.schedule import pages_per_part

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
CONTEXTS = (512, 2048, 8192, 32768)
MAX_CACHE_TOKENS = 128 * 8192  # skip the largest products (memory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="producer_map.md")
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    timer = Timer(args.iters)
    lines = [f"card: {torch.cuda.get_device_name()}; µs, median of {args.iters} calls, L2 flushed",
             "| b, s_k | active parts | pages per part (min/median/max) | TMA | cp.async | auto | TMA ÷ cp.async |",
             "|---|---|---|---|---|---|---|"]
    for batch in BATCHES:
        for s_k in CONTEXTS:
            if batch * s_k > MAX_CACHE_TOKENS:
                continue
            p = build_problem(Case("map", batch, 1, 16, s_k))
            md, ns = get_mla_metadata(p.cache_seqlens, 16, 1)
            pages = sorted(n for n in pages_per_part(md, p.cache_seqlens) if n > 0)
            us = {}
            for setting in ("tma", "cp_async", "auto"):
                os.environ[KV_PRODUCER_ENV] = setting
                reload_settings()  # settings are parsed once per process
                us[setting] = timer.median_us(lambda: flash_mla_with_kvcache(
                    p.q, p.k_cache, p.block_table, p.cache_seqlens, HEAD_V, md, ns,
                    softmax_scale=HEAD_QK ** -0.5, causal=True))
            lines.append(f"| {batch}, {s_k} | {len(pages)} | {pages[0]}/{statistics.median(pages):g}/{pages[-1]} | "
                         f"{us['tma']:.1f} | {us['cp_async']:.1f} | {us['auto']:.1f} | {us['tma'] / us['cp_async']:.3f} |")
            print(lines[-1], flush=True)
            del p
            torch.cuda.empty_cache()
    os.environ.pop(KV_PRODUCER_ENV, None)
    reload_settings()
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:3]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
