"""Representative decode calls for compute-sanitizer (benchmarks/run_sanitizers.sh).

Fixed and variable lengths, empty sequences, causal s_q > 1, h_q in {16, 64, 128}, several
splits per request, two KV heads, q as a (latent, rope) pair of tight buffers (a read past
either half's end is out of bounds); each result is checked against the reference, so a run
that the sanitizer passes also computed the right answer. Small sizes: the sanitizers slow
kernels down by orders of magnitude.
"""

from __future__ import annotations

import sys

import torch

from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata, mla_decode_reference
from flashmla_backend.testing import make_problem

CASES = [
    # lengths, s_q, h_q, h_k, q as a (latent, rope) pair
    ([300, 300, 300], 1, 16, 1, False),            # fixed lengths
    ([0, 1, 77, 640, 0, 2000], 2, 16, 1, False),   # variable, empty sequences, causal s_q = 2
    ([0, 1, 77, 640, 0, 2000], 2, 16, 1, True),    # the same, q as two tensors
    ([4000], 1, 64, 1, False),                     # one request split across many SMs
    ([129, 0, 1500], 4, 128, 1, False),            # causal s_q = 4, 8 query blocks
    ([129, 0, 1500], 4, 128, 1, True),             # the same, q as two tensors
    ([500, 3], 2, 8, 2, False),                    # two KV heads
    (list(range(1, 400, 3)), 1, 16, 1, False),     # 133 short requests: several per CTA (piece hand-offs)
]


def main() -> int:
    worst = 0.0
    for lengths, s_q, h_q, h_k, pair in CASES:
        p = make_problem(lengths, s_q, h_q, h_k, causal=True, seed=len(lengths))
        md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
        q = (p.q[..., :512].clone(), p.q[..., 512:].clone()) if pair else p.q
        out, lse = flash_mla_with_kvcache(q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns,
                                          causal=True)
        ref, _ = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, causal=True)
        torch.cuda.synchronize()
        err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
        worst = max(worst, err)
        print(f"{lengths} s_q={s_q} h_q={h_q} h_k={h_k} q pair={pair} splits={int(ns[-1])}: rel err {err:.2e}",
              flush=True)
    print(f"worst relative error {worst:.2e}")
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
