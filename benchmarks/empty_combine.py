"""What the combine costs where it has nothing to merge: rows whose scheduler splits no request,
timed with and without the combine launch (a diagnostic: without it, split requests would be
wrong, so only rows with no split are timed, and their outputs are compared first).

    python benchmarks/empty_combine.py [--rounds 3] [--iters 50] [--case memory:132,1,16,4096 ...]

Prints, per row, the median µs of each round with and without the combine and the difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import contextmanager
from typing import Iterator

import torch

import flashmla_backend.api as api
from flashmla_backend import flash_mla_with_kvcache, get_mla_metadata, precompile
from flashmla_backend.bench import ANCHOR_CASES, HEAD_QK, HEAD_V, Case, Timer, build_problem, parse_case
from flashmla_backend.kernel_sources import COMBINE_SIGNATURE


@contextmanager
def combine_skipped() -> Iterator[None]:
    """Inside, the API launches everything but the combine."""
    launch = api.launch_kernel

    def launch_all_but_combine(function, signature, *args, **kwargs) -> None:
        if signature is not COMBINE_SIGNATURE:
            launch(function, signature, *args, **kwargs)

    api.launch_kernel = launch_all_but_combine
    try:
        yield
    finally:
        api.launch_kernel = launch


def time_case(case: Case, timer: Timer, rounds: int) -> str | None:
    """One table line for ``case``, or None where the scheduler splits a request."""
    p = build_problem(case)
    b, s_q, h_q, h_k = p.shape
    md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
    if int((ns[1:] - ns[:-1]).max()) > 1:
        return None

    def call() -> torch.Tensor:
        return flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, HEAD_V, md, ns,
                                      softmax_scale=HEAD_QK ** -0.5, causal=True)[0]

    with_combine = call().clone()
    with combine_skipped():
        without = call()
    if not torch.equal(with_combine, without):
        raise AssertionError(f"{case.label}: the output differs without the combine")
    runs: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(rounds):
        runs["with"].append(timer.median_us(call))
        with combine_skipped():
            runs["without"].append(timer.median_us(call))
    a, c = statistics.median(runs["with"]), statistics.median(runs["without"])
    fmt = lambda xs: " / ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    return f"| {case.label} | {fmt(runs['with'])} | {fmt(runs['without'])} | {a - c:+.2f} ({(a - c) / a:+.1%}) |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--case", type=parse_case, action="append", default=[])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("empty_combine.py: no CUDA GPU here.")
        return 0
    precompile()
    timer = Timer(args.iters)
    print(f"## {torch.cuda.get_device_name()}: µs per call (medians of {args.iters}), rounds alternated")
    print("| row | with the combine | without | combine's cost |\n|---|---|---|---|")
    for case in ANCHOR_CASES + args.case:
        line = time_case(case, timer, args.rounds)
        print(line if line else f"| {case.label} | (splits: not timed) | | |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
