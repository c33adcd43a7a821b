"""The decode on the host emulation over seeded random shapes: a wider check than the CPU
suite's, for a kernel change made without a GPU (no GPU needed; a few seconds a case).

    python benchmarks/host_sweep.py [--cases 24] [--seed 2026] [--max-keys 2500] [--v43-share 0.5]

Each case: 1-3 requests of 0 to --max-keys keys, s_q 1-4 (causal), 1-256 query rows per KV head,
one or two KV heads, 1-19 scheduler parts, either KV producer, q as one tensor or a (latent,
rope) pair, random / rising / spike scores; the shipped decode, or v43 (rows on the wgmma N
dimension) where its rows allow, for --v43-share of those. Decode then combine against the
float32 reference, as tests/test_decode_host.py; prints one line a case and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_decode_host as host  # noqa: E402  (the emulated decode's harness)
from host_kernels import COMPILER  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--max-keys", type=int, default=2500)
    ap.add_argument("--v43-share", type=float, default=0.5)
    args = ap.parse_args()
    if COMPILER is None:
        print("no host C++ compiler (g++, c++ or clang++) on PATH")
        return 1
    rng = np.random.default_rng(args.seed)
    failed, start = 0, time.time()
    for case in range(args.cases):
        h_k = int(rng.choice([1, 1, 2]))
        s_q = int(rng.integers(1, 5))
        group = int(rng.choice([1, 2, 7, 16, 33, 64, 80, 128]))
        while s_q * group > 256:
            s_q -= 1
        lengths = [int(n) for n in rng.integers(0, args.max_keys, int(rng.integers(1, 4)))]
        parts, producer = int(rng.integers(1, 20)), str(rng.choice(["tma", "cp_async"]))
        pair, scores = bool(rng.integers(0, 2)), str(rng.choice(["random", "random", "rising", "spike"]))
        source = host.V43 if s_q * group <= 32 and rng.random() < args.v43_share else "mla_decode.cu"
        label = (f"lengths {lengths}, s_q {s_q}, h_q {group * h_k}, h_k {h_k}, parts {parts}, {producer}, "
                 f"{'pair' if pair else 'one tensor'}, {scores}, {Path(source).name}")
        try:
            host.decode_on_host(lengths, s_q, group * h_k, h_k, parts, producer, pair=pair, seed=case,
                                scores=scores, source_file=source)
            print(f"ok    {label}", flush=True)
        except AssertionError as exc:
            failed += 1
            print(f"FAIL  {label}: {str(exc)[:300]}", flush=True)
    print(f"{failed} failed of {args.cases} in {time.time() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
