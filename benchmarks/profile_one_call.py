"""One decode problem, called a few times, for Nsight Compute to profile (GPU machine).

    python benchmarks/profile_one_call.py B S_Q H_Q S_K [--calls 4]

Builds the problem with the benchmark's inputs (random, shuffled block table), computes the
schedule once, then runs ``flash_mla_with_kvcache`` ``--calls`` times; ncu picks the decode
launch it wants with ``--launch-skip``. The decode version comes from the usual
FLASHMLA_BACKEND_DECODE_FILE / _DEFINES environment.
"""

from __future__ import annotations

import argparse

import torch

from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata
from flashmla_backend.testing import make_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("batch", "s_q", "h_q", "s_k"):
        parser.add_argument(name, type=int)
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args()
    p = make_problem([args.s_k] * args.batch, args.s_q, args.h_q, 1, torch.bfloat16, causal=True, poison=False)
    md, ns = get_mla_metadata(p.cache_seqlens, args.s_q * args.h_q, 1)
    for _ in range(args.calls):
        flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns, causal=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
