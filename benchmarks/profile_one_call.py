"""One decode problem, called a few times, for Nsight Compute to profile (GPU machine).

    python benchmarks/profile_one_call.py B S_Q H_Q S_K [--calls 4] [--impl ours|FlashMLA|FA3-MLA]

Builds the problem with the benchmark's inputs (random, shuffled block table), computes the
schedule once, then runs ``flash_mla_with_kvcache`` (or a peer from the benchmark's
``load_peers``, which needs the vLLM bundle) ``--calls`` times; ncu picks the decode launch it
wants with ``--launch-skip``. Our decode version comes from the usual
FLASHMLA_BACKEND_DECODE_FILE / _DEFINES environment.
"""

from __future__ import annotations

import argparse

import torch

from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata
from flashmla_backend.bench import HEAD_QK, HEAD_V, load_peers
from flashmla_backend.testing import make_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("batch", "s_q", "h_q", "s_k"):
        parser.add_argument(name, type=int)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--impl", default="ours", help="ours, or a peer: FlashMLA, FA3-MLA")
    args = parser.parse_args()
    p = make_problem([args.s_k] * args.batch, args.s_q, args.h_q, 1, torch.bfloat16, causal=True, poison=False)
    scale = HEAD_QK ** -0.5
    if args.impl == "ours":
        md, ns = get_mla_metadata(p.cache_seqlens, args.s_q * args.h_q, 1)

        def call() -> object:
            return flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, HEAD_V, md, ns,
                                          softmax_scale=scale, causal=True)
    else:
        peers = load_peers()
        if args.impl not in peers:
            raise SystemExit(f"--impl {args.impl!r}: not importable here (peers: {sorted(peers)})")
        call = peers[args.impl](p, scale)
    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
