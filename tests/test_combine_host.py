"""The split combine (``kernels/mla_combine.cu``) on the host emulation (``host_simt.hpp``),
against a float64 merge of the same partials, on machines without a GPU.

Built as launched plainly and as a programmatic dependent (where CTAs with nothing to merge
leave before the dependency wait). Split requests must come out as the LSE-weighted sum of their
partials (bf16) with the merged LSE, all-masked rows as zeros with LSE +inf; requests with one
split (written by the decode) must be left as they were. The GPU tests check the combine end to
end behind the decode."""

from __future__ import annotations

import numpy as np
import pytest

from flashmla_backend._constants import COMBINE_WARPS, HEAD_DIM_V

from host_kernels import build, host_kernel_source, requires_host_compiler, run

pytestmark = requires_host_compiler

HARNESS = r"""
// argv: s_q h_q h_k warps_per_row batch requests_per_cta total_splits
// stdin: int32 num_splits [batch + 1], f32 o_part [splits, h_k, rows, 512], f32 lse_part
// [splits, h_k, rows], uint16 out [batch, s_q, h_q, 512], f32 lse [batch, h_q, s_q] (both as the
// decode left them); stdout: out, lse after the combine.

int main(int argc, char** argv) {
    if (argc != 8) return 2;
    int arg[7];
    for (int i = 0; i < 7; ++i) arg[i] = std::atoi(argv[i + 1]);
    const int s_q = arg[0], h_q = arg[1], h_k = arg[2], warps_per_row = arg[3], batch = arg[4];
    const int requests_per_cta = arg[5], splits = arg[6];
    const int rows = s_q * (h_q / h_k);
    std::vector<int> num_splits(batch + 1);
    std::vector<float> o_part(size_t(splits) * h_k * rows * HEAD_DIM_V), lse_part(size_t(splits) * h_k * rows);
    std::vector<uint16_t> out(size_t(batch) * s_q * h_q * HEAD_DIM_V);
    std::vector<float> lse(size_t(batch) * h_q * s_q);
    if (!read_all(num_splits) || !read_all(o_part) || !read_all(lse_part) || !read_all(out) || !read_all(lse))
        return 3;
    const unsigned rows_per_cta = COMBINE_WARPS / warps_per_row;
    const dim3 grid{(h_k * rows + rows_per_cta - 1) / rows_per_cta, unsigned((batch + requests_per_cta - 1) / requests_per_cta), 1};
    simt::launch(grid, {COMBINE_WARPS * 32, 1, 1}, 0, [&] {
        mla_combine(o_part.data(), lse_part.data(), num_splits.data(), out.data(), lse.data(), s_q, h_q, h_k,
                    warps_per_row, batch);
    });
    std::fwrite(out.data(), 2, out.size(), stdout);
    std::fwrite(lse.data(), 4, lse.size(), stdout);
    return 0;
}
"""

def combine_on_host(num_splits: np.ndarray, o_part: np.ndarray, lse_part: np.ndarray, out: np.ndarray,
                    lse: np.ndarray, warps_per_row: int, requests_per_cta: int,
                    programmatic: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``mla_combine`` on the host: num_splits int32 [b + 1], o_part f32 [splits, h_k, rows, 512],
    lse_part f32 [splits, h_k, rows], out uint16 (bf16 bits) [b, s_q, h_q, 512] and lse f32
    [b, h_q, s_q] as the decode left them; returns out and lse after the merge."""
    batch, s_q, h_q, _ = out.shape
    h_k = o_part.shape[1]
    defines = ("-DMLA_PROGRAMMATIC_LAUNCH",) if programmatic else ()
    binary = build(host_kernel_source("mla_combine.cu") + HARNESS, defines)
    args = [s_q, h_q, h_k, warps_per_row, batch, requests_per_cta, int(num_splits[-1])]
    parts = (num_splits.astype(np.int32), o_part.astype(np.float32), lse_part.astype(np.float32),
             out.astype(np.uint16), lse.astype(np.float32))
    result = run(binary, args, b"".join(np.ascontiguousarray(a).tobytes() for a in parts))
    got_out = np.frombuffer(result[:out.nbytes], dtype=np.uint16).reshape(out.shape)
    return got_out, np.frombuffer(result[out.nbytes:], dtype=np.float32).reshape(lse.shape)


OUT_POISON = 0x7FC1  # a bf16 NaN the combine never writes
LSE_POISON = -12345.0


def bf16_to_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def merged(o_part: np.ndarray, lse_part: np.ndarray) -> tuple[np.ndarray, float]:
    """The float64 merge of one row's partials [count, 512] and LSEs [count] (natural log)."""
    finite = np.isfinite(lse_part)
    if not finite.any():
        return np.zeros(HEAD_DIM_V), float("inf")
    top = lse_part[finite].max()
    total = top + np.log(np.exp(lse_part[finite] - top).sum())
    weights = np.where(finite, np.exp(np.where(finite, lse_part, 0.0) - total), 0.0)
    return (weights[:, None] * o_part).sum(0), float(total)


CASES = [
    # (batch, s_q, h_q, h_k, splits per request (0: unsplit), warps_per_row, requests_per_cta)
    (1, 1, 16, 1, [64], 8, 1),
    (3, 2, 16, 1, [5, 1, 9], 2, 1),
    (4, 1, 128, 1, [1, 3, 1, 2], 1, 3),  # CTA y serves requests y and y + 2
    (5, 4, 5, 1, [2, 1, 1, 7, 1], 1, 32),
    (2, 1, 64, 2, [17, 4], 4, 1),
    (6, 1, 16, 1, [1, 1, 1, 1, 1, 1], 1, 2),
    (2, 1, 16, 1, [140, 2], 8, 1),  # more than 128 splits: the LSE max in two rounds
]


@pytest.mark.parametrize("programmatic", [False, True], ids=["plain", "programmatic"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_sq{}_hq{}_hk{}_w{}_r{}".format(*c[:4], c[5], c[6]))
def test_combine_merges_split_requests_only(case: tuple, programmatic: bool) -> None:
    batch, s_q, h_q, h_k, counts, warps_per_row, requests_per_cta = case
    rng = np.random.default_rng(batch * 31 + h_q + sum(counts))
    rows = s_q * (h_q // h_k)
    num_splits = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    splits = int(num_splits[-1])
    o_part = rng.standard_normal((splits, h_k, rows, HEAD_DIM_V)).astype(np.float32)
    lse_part = rng.uniform(-6, 6, (splits, h_k, rows)).astype(np.float32)
    lse_part[rng.random(lse_part.shape) < 0.2] = -np.inf  # splits whose keys were all masked
    first_split_request = next(i for i, c in enumerate(counts + [2]) if c > 1)
    if first_split_request < batch:  # one row of a split request with no key at all
        lse_part[num_splits[first_split_request]:num_splits[first_split_request + 1], 0, 0] = -np.inf
    out = np.full((batch, s_q, h_q, HEAD_DIM_V), OUT_POISON, dtype=np.uint16)
    lse = np.full((batch, h_q, s_q), LSE_POISON, dtype=np.float32)

    got_out, got_lse = combine_on_host(num_splits, o_part, lse_part, out, lse, warps_per_row, requests_per_cta,
                                       programmatic)

    group = h_q // h_k
    for req, count in enumerate(counts):
        if count <= 1:
            assert (got_out[req] == OUT_POISON).all(), f"request {req} (unsplit) was written"
            assert (got_lse[req] == LSE_POISON).all(), f"request {req} (unsplit): lse was written"
            continue
        first = num_splits[req]
        for kh in range(h_k):
            for row in range(rows):
                s_idx, head = row // group, kh * group + row % group
                want, want_lse = merged(o_part[first:first + count, kh, row].astype(np.float64),
                                        lse_part[first:first + count, kh, row].astype(np.float64))
                got = bf16_to_float(got_out[req, s_idx, head])
                np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-5,
                                           err_msg=f"request {req}, head {head}, query {s_idx}")
                if np.isinf(want_lse):
                    assert got_lse[req, head, s_idx] == np.inf, "an all-masked row's lse must be +inf"
                else:
                    assert abs(got_lse[req, head, s_idx] - want_lse) < 1e-4, f"lse of request {req}, head {head}"

