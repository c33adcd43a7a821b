"""The decode's online softmax (``online_softmax_page`` in ``kernels/mla_softmax.cuh``) run as
written, for one warpgroup over a sequence of pages, on the host emulation (``host_simt.hpp``).

Each emulated thread holds its fragments of a page's 64 x 64 scores as wgmma leaves them; after
every page it rescales the P it kept from earlier pages by the page's alpha (as the decode
rescales O) and keeps the new P. At the end the row sums are reduced over the quad as the decode
does, and P / sum must equal a float64 softmax of all the scores (log2 domain, the decode's
scale), for ordinary rows, rows whose maximum rises late (the rescale path), isolated spikes
(the kept-max sum test) and rows whose first pages are masked. ``test_softmax_math.py`` models
the same rules in numpy; this runs the kernel's own code, knobs as shipped."""

from __future__ import annotations

import re

import numpy as np
import pytest

from host_kernels import KERNELS, build, definition, requires_host_compiler, run

pytestmark = requires_host_compiler

PAGE, ROWS = 64, 64
_THRESHOLD = re.search(r"#define RESCALE_THRESHOLD_LOG2 ([0-9.]+)f", (KERNELS / "mla_softmax.cuh").read_text())
assert _THRESHOLD is not None, "RESCALE_THRESHOLD_LOG2 not found in mla_softmax.cuh: update this test"
KEPT_MAX_P_LIMIT = 2.0 ** float(_THRESHOLD.group(1))  # as shipped: 2^8

HARNESS = r"""
#include <vector>
// argv: pages scale_log2; stdin: f32 scores [pages][64 rows][64 keys] (-inf = masked);
// stdout: f32 P [64 rows][pages * 64 keys], normalised by the final row sums, then f32 [pages]:
// the largest P any thread held right after each page's softmax (before later rescales).
int main(int argc, char** argv) {
    if (argc != 3) return 2;
    const int pages = std::atoi(argv[1]);
    const float scale_log2 = float(std::atof(argv[2]));
    std::vector<float> scores(size_t(pages) * 64 * 64), p_out(size_t(64) * pages * 64), p_max(pages, 0.f);
    if (std::fread(scores.data(), 4, scores.size(), stdin) != scores.size()) return 3;
    simt::launch({1, 1, 1}, {128, 1, 1}, 0, [&] {
        const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
        float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.f, 0.f};
        std::vector<float> kept(size_t(pages) * 32);  // this thread's P of every page so far
        for (int page = 0; page < pages; ++page) {
            float s[32], alpha[2];
            for (int i = 0; i < 32; ++i)
                s[i] = scores[(size_t(page) * 64 + frag_row(i, warp, lane)) * 64 + frag_col(i, lane)];
            online_softmax_page(s, row_max, row_sum, alpha, scale_log2);
            for (int q = 0; q < page; ++q)  // O's rescale, applied to the P it holds
                for (int i = 0; i < 32; ++i) kept[q * 32 + i] *= ((i >> 1) & 1) ? alpha[1] : alpha[0];
            for (int i = 0; i < 32; ++i) {
                kept[size_t(page) * 32 + i] = s[i];
                p_max[page] = std::fmax(p_max[page], s[i]);  // fibers switch only at barriers
            }
        }
        for (int half = 0; half < 2; ++half) {  // the decode's end of piece: the quad's sum
            row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 1);
            row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 2);
        }
        for (int page = 0; page < pages; ++page)
            for (int i = 0; i < 32; ++i) {
                const int row = frag_row(i, warp, lane), half = (i >> 1) & 1;
                p_out[size_t(row) * pages * 64 + page * 64 + frag_col(i, lane)] =
                    kept[size_t(page) * 32 + i] / row_sum[half];
            }
    });
    std::fwrite(p_out.data(), 4, p_out.size(), stdout);
    std::fwrite(p_max.data(), 4, p_max.size(), stdout);
    return 0;
}
"""


def softmax_program() -> str:
    shared = (KERNELS / "mla_decode_shared.cuh").read_text()
    softmax = (KERNELS / "mla_softmax.cuh").read_text().replace("#pragma once", "")
    needed = "\n\n".join(definition(shared, opening) for opening in (
        r"^DEVICE int frag_row", r"^DEVICE int frag_col", r"^DEVICE float exp2_on_fma_pipe"))
    softmax = softmax.replace('#include "mla_decode_shared.cuh"', needed)
    assert needed in softmax, "mla_softmax.cuh no longer includes mla_decode_shared.cuh: update this test"
    return softmax + HARNESS


def scores_for(kind: str, pages: int, rng: np.random.Generator) -> np.ndarray:
    """[pages, 64 rows, 64 keys] raw scores (before the scale)."""
    s = rng.normal(0.0, 3.0, (pages, ROWS, PAGE)).astype(np.float32)
    if kind == "rising":  # each page's scores well above the last: the max must move
        s += (np.arange(pages, dtype=np.float32) * 40.0)[:, None, None]
    elif kind == "spikes":  # isolated large scores on late pages, below the raise threshold or above
        for row in range(ROWS):  # in log2 units at the decode's default scale: +1.8, +4.8, +12, +24
            page, key = rng.integers(min(1, pages - 1), pages), rng.integers(0, PAGE)
            s[page, row, key] += rng.choice([30.0, 80.0, 200.0, 400.0])
    elif kind == "masked_start":  # the first pages masked for some rows (causal / empty pieces)
        for row in range(0, ROWS, 3):
            s[: 1 + row % pages, row] = -np.inf
    return s


@pytest.mark.parametrize("kind", ["plain", "rising", "spikes", "masked_start"])
@pytest.mark.parametrize("pages", [1, 5])
def test_online_softmax_matches_float64(kind: str, pages: int) -> None:
    rng = np.random.default_rng(pages * 10 + len(kind))
    scale_log2 = float(576 ** -0.5 * 1.4426950408889634)
    s = scores_for(kind, pages, rng)
    result = np.frombuffer(run(build(softmax_program()), [pages, repr(scale_log2)], s.tobytes()), np.float32)
    got, p_max = result[:ROWS * pages * PAGE].reshape(ROWS, pages * PAGE), result[ROWS * pages * PAGE:]
    # The kept max bounds every page's P by 2^RESCALE_THRESHOLD_LOG2 (fp16's P stays finite).
    assert (p_max <= KEPT_MAX_P_LIMIT * (1 + 1e-6)).all(), f"P up to {p_max.max()} after a page's softmax"
    logits = (s.transpose(1, 0, 2).reshape(ROWS, pages * PAGE).astype(np.float64) * scale_log2)
    want = np.zeros_like(logits)
    alive = np.isfinite(logits).any(1)
    top = np.where(alive, np.max(np.where(np.isfinite(logits), logits, -np.inf), 1), 0.0)
    weights = np.exp2(logits[alive] - top[alive, None])
    want[alive] = weights / weights.sum(1, keepdims=True)
    if not alive.all():  # no key at all (masked_start): P is 0 and the sum 0 (stores write 0)
        assert (np.isnan(got[~alive]) | (got[~alive] == 0)).all()
    np.testing.assert_allclose(got[alive], want[alive], rtol=2e-4, atol=1e-7)
