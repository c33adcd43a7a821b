"""Where the host time of an eager call goes (GPU machine).

    python benchmarks/host_profile.py [--calls 200] [--top 25]

For the two latency rows, times ``get_mla_metadata`` and ``flash_mla_with_kvcache`` on the
host (calls enqueued while the GPU sleeps, so none waits on it), then profiles the whole call
with cProfile and prints the functions with the most own time. Under CUDA graphs none of this
is paid; an eager caller pays it once per layer.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata, precompile
from flashmla_backend.bench import ANCHOR_CASES, HEAD_QK, HEAD_V, HOST_TIMING_SLEEP_CYCLES, build_problem, host_us


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    precompile()
    print(f"card: {torch.cuda.get_device_name()}")
    for case in (c for c in ANCHOR_CASES if c.regime == "latency"):
        p = build_problem(case)
        b, s_q, h_q, h_k = p.shape
        rows, scale = s_q * h_q // h_k, HEAD_QK ** -0.5
        md, ns = get_mla_metadata(p.cache_seqlens, rows, h_k)

        def metadata() -> None:
            get_mla_metadata(p.cache_seqlens, rows, h_k)

        def decode() -> None:
            flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, HEAD_V, md, ns,
                                   softmax_scale=scale, causal=True)

        def whole() -> None:
            metadata()
            decode()

        print(f"\n## {case.label}: host µs per call: get_mla_metadata {host_us(metadata, args.calls):.1f}, "
              f"flash_mla_with_kvcache {host_us(decode, args.calls):.1f}, both {host_us(whole, args.calls):.1f}")
        profiler = cProfile.Profile()
        torch.cuda._sleep(HOST_TIMING_SLEEP_CYCLES)
        profiler.enable()
        for _ in range(args.calls // 5):  # the profiler slows calls; the GPU sleep still covers them
            whole()
        profiler.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
