"""The decode's 2^x on the FMA pipe (``exp2_on_fma_pipe`` in ``kernels/mla_decode_shared.cuh``),
emulated in float32 with the constants read from the source (CPU only): accurate well below
bf16 and fp16 rounding over the range the softmax feeds it, and zero-like at the clamp. And
v28's page softmax with a kept max, modelled for one warp with the source's knobs: equal to a
float64 softmax, P bounded by 2^threshold, spikes caught by the sum test."""

from __future__ import annotations

import re

import numpy as np

from flashmla_backend.kernel_sources import kernel_dir


def _constants() -> dict[str, np.float32]:
    source = (kernel_dir() / "mla_decode_shared.cuh").read_text()
    body = source[source.index("DEVICE float exp2_on_fma_pipe"):]
    found = dict(re.findall(r"\b(ROUND_MAGIC|C[0-3])\s*=\s*([0-9.eE+-]+)f", body[:1500]))
    assert set(found) == {"ROUND_MAGIC", "C0", "C1", "C2", "C3"}, found
    return {name: np.float32(value) for name, value in found.items()}


def _fma(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    return (a.astype(np.float64) * np.float64(b) + np.float64(c)).astype(np.float32)


def exp2_on_fma_pipe(x: np.ndarray) -> np.ndarray:
    """The device function, step by step in float32 (float64 products round once, as an FMA)."""
    k = _constants()
    x = np.maximum(x.astype(np.float32), np.float32(-126.0))
    shifted = (x + k["ROUND_MAGIC"]).astype(np.float32)
    frac = (x - (shifted - k["ROUND_MAGIC"]).astype(np.float32)).astype(np.float32)
    p = _fma(frac, k["C3"], k["C2"])
    p = _fma(p, frac, k["C1"])
    p = _fma(p, frac, k["C0"])
    bits = p.view(np.int32) + (shifted.view(np.int32) << np.int32(23))
    return bits.view(np.float32)


def test_relative_error_over_the_softmax_range() -> None:
    # The softmax feeds it s * scale - max: at most the lazy-max threshold (8) above 0.
    x = np.linspace(-125.0, 9.0, 400_001, dtype=np.float32)
    got = exp2_on_fma_pipe(x).astype(np.float64)
    want = np.exp2(x.astype(np.float64))
    worst = np.max(np.abs(got / want - 1.0))
    assert worst < 1e-4, worst  # bf16 rounds at 3.9e-3, fp16 at 4.9e-4


def test_clamp_gives_a_negligible_value() -> None:
    # Masked scores arrive as -inf; the clamp keeps the exponent field from wrapping.
    got = exp2_on_fma_pipe(np.array([-np.inf, -1e30, -200.0, -126.0], dtype=np.float32))
    assert np.all(got >= 0.0) and np.all(got < 2.0 ** -125)


# ---------------------------------------------------------------------------------------------
# v28's page softmax (``online_softmax_page`` in kernels/mla_softmax.cuh), modelled in float32 for
# one warp's 16 rows: every page first tries the row's kept max with no page max; the warp redoes
# the page with its page max if any row has no max yet or a thread's 16 P of a row sum past 2^T.

def _decode_knobs() -> dict[str, float]:
    source = (kernel_dir() / "mla_softmax.cuh").read_text()
    threshold = float(re.search(r"#define RESCALE_THRESHOLD_LOG2 ([0-9.]+)f", source).group(1))
    per_8 = int(re.search(r"#define EXP2_ON_FMA_PER_8 (\d+)", source).group(1))
    clamp = float(re.search(r"fminf\(x, ([0-9.]+)f\)", source).group(1))
    return {"threshold": threshold, "per_8": per_8, "clamp": clamp}


def _polynomial_mask(per_8: int) -> np.ndarray:
    """[16, 64]: which (row, column) of a warp's page the polynomial takes. Accumulator register
    i = 4n + 2 half + j holds row lane/4 + 8 half, column 8n + 2 (lane % 4) + j (frag_col);
    registers with i % 8 < per_8 go to the polynomial."""
    rows, cols = np.meshgrid(np.arange(16), np.arange(64), indexing="ij")
    register = 4 * (cols // 8) + 2 * (rows // 8) + cols % 2
    return register % 8 < per_8


def _exp2_page(x: np.ndarray, knobs: dict[str, float]) -> np.ndarray:
    """2^x as the kernel takes it: the polynomial on the clamped input where _polynomial_mask
    says, ex2 elsewhere (float32; inf past 2^128)."""
    out = np.exp2(x.astype(np.float32))
    poly = _polynomial_mask(int(knobs["per_8"]))
    out[poly] = exp2_on_fma_pipe(np.minimum(x[poly], np.float32(knobs["clamp"])))
    return out


def _thread_sums(p: np.ndarray) -> np.ndarray:
    """[rows, 4]: each quad thread's sum over its 16 columns (8n + 2 (lane % 4) + {0, 1})."""
    cols = np.arange(64)
    return np.stack([p[:, (cols // 2) % 4 == t].sum(axis=1) for t in range(4)], axis=1)


def _model_rows(scores: np.ndarray, values: np.ndarray, knobs: dict[str, float]) -> tuple[np.ndarray, dict[str, int]]:
    """scores [rows, pages * 64] already in log2 units; returns (out [rows, d], path counts), and
    checks on the way that no P passes 2^T."""
    rows, keys = scores.shape
    limit = np.float32(2.0 ** knobs["threshold"])
    row_max = np.full(rows, -np.inf, dtype=np.float32)
    row_sum = np.zeros(rows, dtype=np.float32)
    o = np.zeros((rows, values.shape[1]), dtype=np.float32)
    counts = {"kept": 0, "redone": 0, "raised": 0}
    for page in range(keys // 64):
        s = scores[:, page * 64:(page + 1) * 64].astype(np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            p = _exp2_page(s - row_max[:, None], knobs)
            sums = _thread_sums(p)
        redo = np.isneginf(row_max).any() or not np.all(sums <= limit)  # NaN sums fail too
        alpha = np.ones(rows, dtype=np.float32)
        if redo:
            counts["redone"] += 1
            page_max = s.max(axis=1)
            raise_ = page_max > row_max + np.float32(knobs["threshold"])
            counts["raised"] += int(raise_.sum())
            m_new = np.where(raise_, page_max, row_max)
            m_use = np.where(np.isneginf(m_new), np.float32(0.0), m_new)
            alpha = np.where(raise_, np.exp2(row_max - m_use), np.float32(1.0)).astype(np.float32)
            row_max = m_new
            p = _exp2_page(s - m_use[:, None], knobs)
        else:
            counts["kept"] += 1
        assert np.all(p <= limit), f"page {page}: P up to {p.max()} past 2^T"
        row_sum = row_sum * alpha + p.sum(axis=1, dtype=np.float32)
        o = o * alpha[:, None] + p @ values[page * 64:(page + 1) * 64]
    return o / row_sum[:, None], counts


def test_kept_max_softmax_matches_float64_and_keeps_p_bounded() -> None:
    knobs = _decode_knobs()
    gen = np.random.default_rng(0)
    pages, d = 24, 32
    scores = gen.normal(0.0, 1.5, (16, pages * 64)).astype(np.float32)
    scores[3, :640] += np.linspace(0.0, 20.0, 640, dtype=np.float32)  # a max rising 2 per page, pages 0-9
    # Spikes on pages no other row redoes: past 2^127 only the clamp keeps the polynomial's
    # result large (row 5, column 16 is a polynomial one); ex2 gives inf (row 7, column 40).
    scores[5, 64 * 14 + 16] = 180.0
    scores[7, 64 * 20 + 40] = 180.0
    scores[2, 64 * 17 + 17] = 90.0  # a polynomial column past the clamp, within the polynomial's range
    scores[9, 100:140] = -np.inf  # masked keys
    values = gen.normal(0.0, 1.0, (pages * 64, d)).astype(np.float32)
    got, counts = _model_rows(scores, values, knobs)
    weights = np.exp2(scores.astype(np.float64) - scores.max(axis=1, keepdims=True))
    want = weights @ values.astype(np.float64) / weights.sum(axis=1, keepdims=True)
    assert np.max(np.abs(got - want)) < 1e-4 * np.max(np.abs(want))
    # Both paths ran: most pages kept the max; first page, the rising row and the spikes redid.
    assert counts["kept"] >= pages // 2 and counts["redone"] >= 4 and counts["raised"] >= 3, counts
    assert _polynomial_mask(int(knobs["per_8"])).mean() == knobs["per_8"] / 8  # its share of the exponentials


def test_clamp_keeps_an_unkept_score_visible_to_the_sum_test() -> None:
    # Without the clamp, 2^200 by the polynomial wraps its exponent field to a small number and
    # the page would pass the sum test with a wrong P; with it, P is 2^clamp and fails it.
    knobs = _decode_knobs()
    big = np.array([200.0, 1e30, np.inf], dtype=np.float32)
    assert np.all(exp2_on_fma_pipe(np.minimum(big, np.float32(knobs["clamp"]))) > 2.0 ** knobs["threshold"])
    assert exp2_on_fma_pipe(np.array([200.0], dtype=np.float32))[0] < 2.0 ** knobs["threshold"]
