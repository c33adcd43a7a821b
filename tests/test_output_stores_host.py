"""The decode's output stores (``store_output`` in ``kernels/mla_decode_shared.cuh``: a quad
exchange so that each lane stores 16 contiguous bytes) on the host emulation
(``host_simt.hpp``), for both math warpgroups' halves of O, on machines without a GPU.

Each of 128 emulated threads holds its accumulator fragments of a known 64 x 512 block, as
wgmma leaves them; the stores must write row r normalised by its sum, as bf16 into ``out``
(with the LSE, +inf for an empty row) for an unsplit request, or as float32 into ``o_part``
(with ``lse_part``, -inf for an empty row) for a split one, bit for bit, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from flashmla_backend._constants import BLOCK_M, HEAD_DIM_V

from host_kernels import KERNELS, build, constant, definition, requires_host_compiler, run

pytestmark = requires_host_compiler

HARNESS = r"""
// argv: batch s_q h_q h_k kh row_base req split splits is_split
// stdin: f32 block [64][512] (this CTA's rows of O before normalisation), f32 row_sum[64],
// f32 row_lse[64], then out (uint16), lse, o_part, lse_part as poisoned by the caller;
// stdout: out, lse, o_part, lse_part after both warpgroups' stores.

int main(int argc, char** argv) {
    if (argc != 11) return 2;
    int arg[10];
    for (int i = 0; i < 10; ++i) arg[i] = std::atoi(argv[i + 1]);
    const int batch = arg[0], s_q = arg[1], h_q = arg[2], h_k = arg[3], kh = arg[4], row_base = arg[5];
    const RowMap rows{s_q * (h_q / h_k), h_q / h_k};
    Piece piece{};
    piece.req = arg[6];
    piece.split = arg[7];
    piece.is_split = arg[9] != 0;
    const int splits = arg[8];
    std::vector<float> block(64 * HEAD_DIM_V), row_sum(64), row_lse(64);
    std::vector<uint16_t> out(size_t(batch) * s_q * h_q * HEAD_DIM_V);
    std::vector<float> lse(size_t(batch) * h_q * s_q), o_part(size_t(splits) * h_k * rows.rows * HEAD_DIM_V),
        lse_part(size_t(splits) * h_k * rows.rows);
    if (!read_all(block) || !read_all(row_sum) || !read_all(row_lse) || !read_all(out) || !read_all(lse) ||
        !read_all(o_part) || !read_all(lse_part))
        return 3;
    // Threads 0-127 are warpgroup 0 (columns 0-255, writes the LSE), 128-255 warpgroup 1.
    simt::launch({1, 1, 1}, {256, 1, 1}, 0, [&] {
        const int tid = threadIdx.x % 128, col_base = threadIdx.x < 128 ? 0 : V_COLS_PER_WG;
        const int warp = tid / 32, lane = tid % 32;
        float o[128];
        for (int i = 0; i < 128; ++i) o[i] = block[frag_row(i, warp, lane) * HEAD_DIM_V + col_base + frag_col(i, lane)];
        float sums[2], lses[2];
        for (int half = 0; half < 2; ++half) {
            sums[half] = row_sum[warp * 16 + lane / 4 + 8 * half];
            lses[half] = row_lse[warp * 16 + lane / 4 + 8 * half];
        }
        store_output(o, sums, lses, col_base, warp, lane, piece, kh, row_base, rows, s_q, h_q, h_k, out.data(),
                     lse.data(), o_part.data(), lse_part.data(), col_base == 0);
    });
    write_all(out);
    write_all(lse);
    write_all(o_part);
    write_all(lse_part);
    return 0;
}
"""

OUT_POISON = 0x7FC1
F32_POISON = -12345.0


def store_program() -> str:
    shared = (KERNELS / "mla_decode_shared.cuh").read_text()
    common = (KERNELS / "mla_common.cuh").read_text()
    parts = [constant(common, n) for n in ("HEAD_DIM_QK", "HEAD_DIM_V", "PAGE_SIZE", "BLOCK_M")]
    parts += [constant(shared, "V_COLS_PER_WG")]
    parts += [definition(shared, opening) for opening in (
        r"^struct Piece \{", r"^struct RowMap \{", r"^DEVICE int frag_row", r"^DEVICE int frag_col",
        r"^template <typename T>\nDEVICE void exchange_halves", r"^DEVICE void store_output")]
    return "#include <vector>\n" + "\n\n".join(parts) + HARNESS


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (cvt.rn.bf16.f32)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


CASES = [
    # (batch, s_q, h_q, h_k, kh, row_base, req, split, splits)
    (2, 1, 16, 1, 0, 0, 1, 3, 5),
    (1, 2, 64, 1, 0, 64, 0, 1, 2),     # the second 64-row block of 128 rows
    (3, 4, 5, 1, 0, 0, 2, 0, 1),       # 20 rows: padding rows must not be stored
    (1, 1, 128, 2, 1, 0, 0, 2, 4),     # the second KV head, 64 rows each
    (2, 3, 24, 1, 0, 64, 1, 1, 3),     # 72 rows: a last block of 8
]


@pytest.mark.parametrize("is_split", [False, True], ids=["final_output", "split_partial"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_sq{}_hq{}_hk{}_kh{}_rowbase{}".format(*c[:6]))
def test_stores_write_each_row_once_in_place(case: tuple, is_split: bool) -> None:
    batch, s_q, h_q, h_k, kh, row_base, req, split, splits = case
    rng = np.random.default_rng(sum(case) * 13 + is_split)
    group, rows = h_q // h_k, s_q * (h_q // h_k)
    block = rng.standard_normal((BLOCK_M, HEAD_DIM_V)).astype(np.float32)
    row_sum = rng.uniform(0.5, 40.0, BLOCK_M).astype(np.float32)
    row_sum[5] = 0.0  # a row with no key
    row_lse = rng.uniform(-3.0, 9.0, BLOCK_M).astype(np.float32)
    out = np.full((batch, s_q, h_q, HEAD_DIM_V), OUT_POISON, np.uint16)
    lse = np.full((batch, h_q, s_q), F32_POISON, np.float32)
    o_part = np.full((splits, h_k, rows, HEAD_DIM_V), F32_POISON, np.float32)
    lse_part = np.full((splits, h_k, rows), F32_POISON, np.float32)

    binary = build(store_program())
    stdin = b"".join(a.tobytes() for a in (block, row_sum, row_lse, out, lse, o_part, lse_part))
    result = run(binary, [batch, s_q, h_q, h_k, kh, row_base, req, split, splits, int(is_split)], stdin)
    sizes = np.cumsum([out.nbytes, lse.nbytes, o_part.nbytes, lse_part.nbytes])
    assert len(result) == sizes[-1], "the harness wrote the wrong amount"
    got_out = np.frombuffer(result[:sizes[0]], np.uint16).reshape(out.shape)
    got_lse = np.frombuffer(result[sizes[0]:sizes[1]], np.float32).reshape(lse.shape)
    got_part = np.frombuffer(result[sizes[1]:sizes[2]], np.float32).reshape(o_part.shape)
    got_lse_part = np.frombuffer(result[sizes[2]:], np.float32).reshape(lse_part.shape)

    inv = np.where(row_sum > 0, np.float32(1.0) / np.where(row_sum > 0, row_sum, 1), 0).astype(np.float32)
    normalised = (block * inv[:, None]).astype(np.float32)
    want_out, want_lse, want_part, want_lse_part = out.copy(), lse.copy(), o_part.copy(), lse_part.copy()
    for r in range(BLOCK_M):
        grow = row_base + r
        if grow >= rows:
            continue
        s_idx, head = grow // group, kh * group + grow % group
        if is_split:
            want_part[split, kh, grow] = normalised[r]
            want_lse_part[split, kh, grow] = row_lse[r] if row_sum[r] > 0 else -np.inf
        else:
            want_out[req, s_idx, head] = bf16_bits(normalised[r])
            want_lse[req, head, s_idx] = row_lse[r] if row_sum[r] > 0 else np.inf
    np.testing.assert_array_equal(got_out, want_out, err_msg="out")
    np.testing.assert_array_equal(got_lse, want_lse, err_msg="lse")
    np.testing.assert_array_equal(got_part, want_part, err_msg="o_part")
    np.testing.assert_array_equal(got_lse_part, want_lse_part, err_msg="lse_part")
