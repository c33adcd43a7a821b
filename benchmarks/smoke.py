"""Quick GPU smoke check: a handful of shapes, printing the error of each (not a test)."""

import sys
import time

import torch

from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata, mla_decode_reference, precompile
from flashmla_backend.testing import make_problem

t0 = time.time()
precompile()
print(f"precompile {time.time() - t0:.2f}s", flush=True)
cases = [([200, 64], 1, 16, 1), ([1], 1, 16, 1), ([5000, 0, 130], 2, 16, 1), ([4096] * 8, 1, 128, 1),
         ([300, 1000], 4, 128, 1), ([700, 9], 2, 6, 2)]
for lengths, s_q, h_q, h_k in cases:
    p = make_problem(lengths, s_q, h_q, h_k, causal=True, seed=1)
    md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
    out, lse = flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns, causal=True)
    ref, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, causal=True)
    torch.cuda.synchronize()
    err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    fin = torch.isfinite(ref_lse)
    lse_err = (lse[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
    print(f"{lengths[:4]} s_q={s_q} h_q={h_q} h_k={h_k}: rel err {err:.3e}, lse max err {lse_err:.3e}, "
          f"nan {bool(torch.isnan(out).any())}, inf-match {torch.equal(torch.isinf(lse), torch.isinf(ref_lse))}",
          flush=True)
sys.exit(0)
