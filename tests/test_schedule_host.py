"""The GPU scheduler kernels (``kernels/mla_schedule.cu``: the CTA-wide ``mla_schedule`` and the
one-warp ``mla_schedule_small``) run on the host emulation (``host_simt.hpp``) and must give
``schedule_reference``'s metadata and split counts bit for bit, on machines without a GPU.
The GPU tests (``test_gpu_decode.py``) check the same kernels on a Hopper GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashmla_backend._constants import (METADATA_FIELDS, NO_SPLIT_SLACK_16THS, SMALL_SCHEDULE_MAX_BATCH,
                                         SPLIT_OVERHEAD_PAGES)
from flashmla_backend.schedule import schedule_reference

from host_kernels import build, host_kernel_source, requires_host_compiler, run

pytestmark = requires_host_compiler

HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
// argv: batch parts overhead slack whole small; stdin: int32 seqlens [batch];
// stdout: int32 metadata [parts, METADATA_FIELDS] then int32 num_splits [batch + 1].
int main(int argc, char** argv) {
    if (argc != 7) return 2;
    const int batch = std::atoi(argv[1]), parts = std::atoi(argv[2]), overhead = std::atoi(argv[3]);
    const int slack = std::atoi(argv[4]), whole = std::atoi(argv[5]), small = std::atoi(argv[6]);
    std::vector<int> seqlens(batch), metadata(parts * METADATA_FIELDS, -7), num_splits(batch + 1, -7);
    if (std::fread(seqlens.data(), 4, batch, stdin) != size_t(batch)) return 3;
    if (small)
        simt::launch({1, 1, 1}, {SMALL_SCHEDULE_THREADS, 1, 1}, 0, [&] {
            mla_schedule_small(seqlens.data(), batch, parts, overhead, slack, whole, metadata.data(), num_splits.data());
        });
    else
        simt::launch({1, 1, 1}, {SCHEDULE_THREADS, 1, 1}, (batch + 1) * sizeof(int), [&] {
            mla_schedule(seqlens.data(), batch, parts, overhead, slack, whole, metadata.data(), num_splits.data());
        });
    std::fwrite(metadata.data(), 4, metadata.size(), stdout);
    std::fwrite(num_splits.data(), 4, num_splits.size(), stdout);
    return 0;
}
"""


def emulated_schedule(lengths: np.ndarray, parts: int, overhead: int, slack: int, whole: bool,
                      small: bool) -> tuple[np.ndarray, np.ndarray]:
    binary = build(host_kernel_source("mla_schedule.cu") + HARNESS)
    batch = lengths.size
    out = run(binary, [batch, parts, overhead, slack, int(whole), int(small)], lengths.astype(np.int32).tobytes())
    values = np.frombuffer(out, dtype=np.int32)
    assert values.size == parts * METADATA_FIELDS + batch + 1, "the harness wrote the wrong amount"
    return values[:parts * METADATA_FIELDS].reshape(parts, METADATA_FIELDS), values[parts * METADATA_FIELDS:]


def batch_lengths(kind: str, batch: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "equal":
        return np.full(batch, 4096)
    if kind == "short":
        return rng.integers(1, 200, batch)
    if kind == "zeros":
        lengths = rng.integers(0, 9000, batch)
        lengths[rng.random(batch) < 0.4] = 0
        return lengths
    if kind == "long_tail":
        lengths = rng.integers(1, 3000, batch)
        lengths[rng.integers(0, batch)] = 131072
        return lengths
    return rng.integers(0, 70000, batch)


CASES = [
    # (batch, parts, length kind)
    (1, 132, "uniform"), (1, 132, "zeros"), (8, 66, "uniform"), (8, 132, "equal"), (31, 132, "zeros"),
    (32, 132, "long_tail"), (32, 300, "short"), (33, 132, "uniform"), (128, 132, "equal"),
    (128, 132, "short"), (130, 132, "zeros"), (500, 132, "long_tail"), (1500, 264, "uniform"),
    (2100, 132, "short"),  # three passes of the CTA-wide kernel's 1024 threads
]
KNOBS = [(SPLIT_OVERHEAD_PAGES, NO_SPLIT_SLACK_16THS, True), (SPLIT_OVERHEAD_PAGES, 0, False), (2, 16, True)]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "overhead{}_slack{}_whole{}".format(*k))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_parts{}_{}".format(*c))
def test_scheduler_kernels_match_the_reference(case: tuple[int, int, str], knobs: tuple[int, int, bool]) -> None:
    batch, parts, kind = case
    overhead, slack, whole = knobs
    rng = np.random.default_rng(batch * 1009 + parts * 7 + len(kind))
    lengths = batch_lengths(kind, batch, rng)
    want_md, want_ns = schedule_reference(torch.from_numpy(lengths.astype(np.int32)), parts, overhead=overhead,
                                          slack_16ths=slack, whole=whole)
    kernels = [False] + ([True] if batch <= SMALL_SCHEDULE_MAX_BATCH else [])
    for small in kernels:
        md, ns = emulated_schedule(lengths, parts, overhead, slack, whole, small)
        name = "mla_schedule_small" if small else "mla_schedule"
        np.testing.assert_array_equal(ns, want_ns.numpy(), err_msg=f"{name}: num_splits")
        np.testing.assert_array_equal(md, want_md.numpy(), err_msg=f"{name}: metadata")

