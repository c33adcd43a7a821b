"""The decode's 2^x on the FMA pipe (``exp2_on_fma_pipe`` in ``kernels/mla_decode_shared.cuh``),
emulated in float32 with the constants read from the source (CPU only): accurate well below
bf16 and fp16 rounding over the range the softmax feeds it, and zero-like at the clamp."""

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
