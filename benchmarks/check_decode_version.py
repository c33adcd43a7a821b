"""Correctness gate for an archived decode version before it is timed (GPU machine).

    FLASHMLA_BACKEND_DECODE_FILE=$PWD/benchmarks/kernel_versions/<name>.cu \\
        python benchmarks/check_decode_version.py [--max-rows 32]

Runs the API (so the swapped-in decode, the scheduler and the combine) on poisoned random
problems whose query rows per KV head (s_q * h_q / h_k) fit ``--max-rows``: fixed and variable
lengths, empty sequences, tails inside a page, causal s_q = 2, odd head counts, two KV heads,
fp16, a long context split over many SMs, and (with ``--max-rows`` >= 64) 64 to 256 rows with
1-4 pages per request. A failing case also reports the error of each half of the output
columns (the two math warpgroups' halves) and of the LSE, to localise the fault. Compares output and LSE with the float32 reference,
then calls again into a NaN-poisoned output and requires the same bits (state a launch leaves
behind, such as split-merge counters, must not change the next one); exits 1 if any case is off.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata, mla_decode_reference
from flashmla_backend.testing import make_problem

# lengths, s_q, h_q, h_k, dtype
CASES = [
    ([4096] * 8, 1, 16, 1, torch.bfloat16),
    ([1, 20, 63, 64, 65, 700, 0, 3000], 1, 16, 1, torch.bfloat16),
    ([0, 0, 0], 1, 16, 1, torch.bfloat16),
    ([129, 5, 2000, 64], 2, 16, 1, torch.bfloat16),
    ([300] * 6, 1, 32, 1, torch.bfloat16),
    ([1000, 17], 1, 3, 1, torch.bfloat16),
    ([500, 3, 77], 2, 8, 2, torch.bfloat16),
    ([1, 2, 3, 4], 1, 1, 1, torch.bfloat16),
    ([4096, 100], 2, 16, 1, torch.float16),
    ([16384], 1, 16, 1, torch.bfloat16),
    (list(range(1, 400, 3)), 1, 16, 1, torch.bfloat16),
    # Large batches of unequal lengths: some requests split, about one part per request.
    ([3000 - 29 * i for i in range(100)], 1, 16, 1, torch.bfloat16),
    # More than 32 rows per KV head (compute-bound shapes): one and several 64-row blocks, and
    # 1, 2, 3, 4 pages per request (page pairs and a lone last page for paired schedules).
    ([64, 128, 192, 256, 0, 1000], 1, 64, 1, torch.bfloat16),
    ([2048, 1, 65, 700], 1, 128, 1, torch.bfloat16),
    ([1500, 64, 3], 2, 128, 1, torch.bfloat16),
    ([900, 4096], 1, 128, 1, torch.float16),
    ([700 + 13 * i for i in range(40)], 1, 128, 1, torch.bfloat16),
]
TOLERANCE = 1e-2


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-rows", type=int, default=32, help="largest s_q * h_q / h_k the version takes")
    parser.add_argument("--device", default="cuda", help="cpu runs the reference path (a dry run of this script)")
    args = parser.parse_args()
    print(f"decode source: {os.environ.get('FLASHMLA_BACKEND_DECODE_FILE', 'kernels/mla_decode.cu')}")
    worst, failed = 0.0, 0
    for lengths, s_q, h_q, h_k, dtype in CASES:
        if s_q * h_q // h_k > args.max_rows:
            continue
        p = make_problem(lengths, s_q, h_q, h_k, dtype=dtype, device=args.device, causal=True, seed=len(lengths) + h_q)
        md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
        out, lse = flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns, causal=True)
        ref, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, causal=True)
        err = relative_error(out, ref)
        finite = torch.isfinite(ref_lse)
        lse_ok = bool(torch.equal(torch.isfinite(lse), finite)) and (
            not finite.any() or torch.allclose(lse[finite].double(), ref_lse[finite].double(), atol=1e-3, rtol=1e-3))
        again = torch.full_like(out, float("nan"))
        _, lse_again = flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, md, ns,
                                              causal=True, out=again)
        repeats = bool(torch.equal(again, out)) and bool(torch.equal(lse_again, lse))
        bad = not (err < TOLERANCE) or not lse_ok or not torch.isfinite(out).all() or not repeats
        failed += bad
        worst = max(worst, err if err == err else float("inf"))
        print(f"{'FAIL' if bad else 'ok  '} lengths={lengths if len(lengths) <= 8 else f'{len(lengths)} requests'} "
              f"s_q={s_q} h_q={h_q} h_k={h_k} {str(dtype)[6:]}: rel err {err:.2e}, lse {'ok' if lse_ok else 'WRONG'}"
              f"{'' if repeats else ', second call DIFFERS'}",
              flush=True)
        if bad:
            half = out.shape[-1] // 2
            left, right = relative_error(out[..., :half], ref[..., :half]), relative_error(out[..., half:], ref[..., half:])
            lse_diff = (lse.double() - ref_lse.double())[finite].abs().max().item() if finite.any() else 0.0
            print(f"     columns [0, {half}): rel err {left:.2e}; [{half}, {2 * half}): {right:.2e}; "
                  f"non-finite outputs {int((~torch.isfinite(out)).sum())}; max |lse diff| {lse_diff:.2e}", flush=True)
    print(f"{failed} failed; worst relative error {worst:.2e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
