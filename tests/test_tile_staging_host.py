"""The decode's shared-memory tile staging, compiled for the host and checked byte for byte
against the 128-byte-swizzled tile layout, on machines without a GPU.

A tile is nine 8 KB chunks of 64 rows x 128 bytes: 16-byte vector ``v`` of row ``r`` lands at
``(v // 8) * 8192 + r * 128 + ((v % 8) ^ (r % 8)) * 16``, the layout TMA writes with the 128B
swizzle and the wgmma descriptors read. Checked here, from ``kernels/mla_decode_shared.cuh``:
- ``load_q_block``: a Q block, rows past the block's valid rows zero. The latent columns
  (vectors 0-63) and the RoPE columns (64-71) come from two pointers with their own strides
  (``QSource``); one ``[.., 576]`` tensor is the case ``rope = latent + 512`` with the same strides.
- ``copy_page_cp_async``: a KV page by the cp.async producer's 128 threads (its index walk is
  stepped incrementally to fit 40 registers).
- ``zero_v_tail``: the V rows past a sequence's end zeroed, nothing else touched.
The device functions' own text is taken out of the header and built on the host emulation
(``host_simt.hpp``: ``cp.async`` becomes a 16-byte copy or zero fill); every thread's loop runs
and the tile is compared with the layout computed here in numpy. The GPU tests
(``test_split_query.py``, ``test_gpu_decode.py``) check the same paths end to end.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from flashmla_backend import _constants as C

from host_kernels import KERNELS, build, constant, definition, requires_host_compiler, run

pytestmark = requires_host_compiler

CHUNK_BYTES = C.PAGE_SIZE * 64 * 2
TILE_BYTES = (C.HEAD_DIM_QK // 64) * CHUNK_BYTES


HARNESS = r"""
#include <vector>
%(definitions)s

// argv[1]: "q", "page" or "vtail".
// q: threads b s_q h_q h_k latent_strides(3) rope_strides(3) latent_elems rope_elems; stdin: the
//    latent then the rope buffer (uint16); stdout: every (req, kh, row block) tile in order.
// page: token_stride; stdin: one page (uint16 [64 * token_stride]); stdout: the tile.
// vtail: first_row; stdin: a tile; stdout: the tile after zero_v_tail.
int main(int argc, char** argv) {
    if (argc < 3) return 2;
    const std::string mode = argv[1];
    std::vector<long long> v;
    for (int i = 2; i < argc; ++i) v.push_back(std::atoll(argv[i]));
    std::vector<uint8_t> tile(TILE_BYTES);
    if (mode == "page" || mode == "vtail") {
        std::vector<uint16_t> page(mode == "page" ? size_t(PAGE_SIZE * v[0]) : 0);
        if (mode == "page" && std::fread(page.data(), 2, page.size(), stdin) != page.size()) return 3;
        if (mode == "vtail" && std::fread(tile.data(), 1, tile.size(), stdin) != tile.size()) return 3;
        if (mode == "page") std::memset(tile.data(), 0xA5, tile.size());  // poison: every byte must be written
        for (int tid = 0; tid < WG_THREADS; ++tid) {
            if (mode == "page") copy_page_cp_async(tile.data(), page.data(), v[0], tid);
            else zero_v_tail(tile.data(), int(v[0]), tid);
        }
        std::fwrite(tile.data(), 1, tile.size(), stdout);
        return 0;
    }
    if (mode != "q" || v.size() != 13) return 2;
    const int threads = int(v[0]), b = int(v[1]), s_q = int(v[2]), h_q = int(v[3]), h_k = int(v[4]);
    std::vector<uint16_t> latent(v[11]), rope(v[12]);
    if (std::fread(latent.data(), 2, latent.size(), stdin) != latent.size()) return 3;
    if (std::fread(rope.data(), 2, rope.size(), stdin) != rope.size()) return 3;
    const QSource q{latent.data(), v[5], v[6], v[7], rope.data(), v[8], v[9], v[10]};
    const RowMap rows{s_q * (h_q / h_k), h_q / h_k};
    for (int req = 0; req < b; ++req)
        for (int kh = 0; kh < h_k; ++kh)
            for (int row_base = 0; row_base < rows.rows; row_base += BLOCK_M) {
                std::memset(tile.data(), 0xA5, tile.size());
                for (int tid = 0; tid < threads; ++tid) {
                    if (threads == CONSUMER_THREADS) load_q_block(tile.data(), q, req, kh, row_base, rows, tid);
                    else load_q_block<96>(tile.data(), q, req, kh, row_base, rows, tid);
                }
                std::fwrite(tile.data(), 1, tile.size(), stdout);
            }
    return 0;
}
"""


@pytest.fixture(scope="module")
def staging_program() -> Path:
    """The header's tile staging code built into a host program."""
    shared = (KERNELS / "mla_decode_shared.cuh").read_text()
    common = (KERNELS / "mla_common.cuh").read_text()
    parts = [constant(common, n) for n in ("HEAD_DIM_QK", "HEAD_DIM_V", "PAGE_SIZE", "BLOCK_M")]
    parts += [constant(shared, n) for n in ("CHUNK_COLS", "CHUNK_BYTES", "QK_CHUNKS", "V_CHUNKS", "TILE_BYTES",
                                             "WG_THREADS", "CONSUMER_THREADS", "Q_LATENT_VECS", "Q_ROPE_VECS")]
    parts += [definition(shared, opening) for opening in (
        r"^struct RowMap \{", r"^struct QSource \{",
        r"^template <int THREADS, int FIRST_VEC, int VECS>\nDEVICE void copy_q_columns",
        r"^template <int THREADS = CONSUMER_THREADS>\nDEVICE void load_q_block",
        r"^DEVICE void copy_page_cp_async", r"^DEVICE void zero_v_tail")]
    return build("#include <string>\n" + HARNESS % {"definitions": "\n\n".join(parts)})


def swizzled_at(row: int, vec: int) -> int:
    """Byte offset of 16-byte vector ``vec`` of row ``row`` in a tile."""
    return (vec // 8) * CHUNK_BYTES + row * 128 + ((vec % 8) ^ (row % 8)) * 16


@dataclass
class Query:
    """q of shape [b, s_q, h_q, 576] as two strided halves inside two flat uint16 buffers."""
    values: np.ndarray          # [b, s_q, h_q, 576] uint16, the logical query
    latent: np.ndarray          # flat buffer holding the latent half
    latent_strides: tuple[int, int, int]
    rope: np.ndarray            # flat buffer holding the RoPE half (may be `latent`, offset 512)
    rope_strides: tuple[int, int, int]
    rope_offset: int = 0


def _scatter(values: np.ndarray, strides: tuple[int, int, int], columns: slice, size: int,
             rng: np.random.Generator, offset: int = 0, into: np.ndarray | None = None) -> np.ndarray:
    buffer = rng.integers(0, 1 << 16, size, dtype=np.uint16) if into is None else into
    b, s_q, h_q, _ = values.shape
    for i in range(b):
        for s in range(s_q):
            for h in range(h_q):
                start = offset + i * strides[0] + s * strides[1] + h * strides[2]
                part = values[i, s, h, columns]
                buffer[start:start + part.size] = part
    return buffer


def one_tensor(values: np.ndarray, rng: np.random.Generator, head_pad: int, token_pad: int) -> Query:
    """FlashMLA's single [.., 576] tensor, rows padded by `head_pad` elements (16-byte units)."""
    b, s_q, h_q, _ = values.shape
    sh = C.HEAD_DIM_QK + head_pad
    ss = sh * h_q + token_pad
    strides = (ss * s_q, ss, sh)
    buffer = _scatter(values, strides, slice(None), b * ss * s_q, rng)
    return Query(values, buffer, strides, buffer, strides, rope_offset=C.HEAD_DIM_V)


def vllm_halves(values: np.ndarray, rng: np.random.Generator) -> Query:
    """vLLM's pair: q_nope a transposed view of a [h_q, T, 512] buffer, q_pe the last 64 columns
    of a [T, h_q, 192] projection (T = b * s_q tokens)."""
    b, s_q, h_q, _ = values.shape
    tokens = b * s_q
    latent_strides = (s_q * 512, 512, tokens * 512)
    latent = _scatter(values, latent_strides, slice(0, 512), h_q * tokens * 512, rng)
    rope_strides = (s_q * h_q * 192, h_q * 192, 192)
    rope = _scatter(values, rope_strides, slice(512, 576), tokens * h_q * 192, rng, offset=128)
    return Query(values, latent, latent_strides, rope[128:], rope_strides)


def expected_tiles(values: np.ndarray, h_k: int) -> bytes:
    """The swizzled tiles the kernel must write, in the harness's (req, kh, row block) order."""
    b, s_q, h_q, _ = values.shape
    group = h_q // h_k
    rows = s_q * group
    out = []
    for req in range(b):
        for kh in range(h_k):
            for row_base in range(0, rows, C.BLOCK_M):
                tile = np.zeros(TILE_BYTES, dtype=np.uint8)
                for r in range(C.BLOCK_M):
                    grow = row_base + r
                    if grow >= rows:
                        continue  # zero rows past the end
                    vectors = values[req, grow // group, kh * group + grow % group].view(np.uint8).reshape(72, 16)
                    for vec in range(72):
                        tile[swizzled_at(r, vec):swizzled_at(r, vec) + 16] = vectors[vec]
                out.append(tile.tobytes())
    return b"".join(out)


def run_staging(program: Path, query: Query, h_k: int, threads: int) -> bytes:
    b, s_q, h_q, _ = query.values.shape
    rope = query.rope[query.rope_offset:]
    args = ["q", threads, b, s_q, h_q, h_k, *query.latent_strides, *query.rope_strides, query.latent.size, rope.size]
    return run(program, args, query.latent.tobytes() + rope.tobytes())


SHAPES = [(1, 1, 16, 1), (2, 2, 16, 1), (3, 1, 128, 1), (2, 4, 24, 1), (1, 3, 5, 1), (2, 1, 64, 2), (1, 2, 96, 2)]


@pytest.mark.parametrize("threads", [256, 96], ids=["consumers", "96_threads"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_sq{}_hq{}_hk{}".format(*s))
@pytest.mark.parametrize("form", ["one_tensor", "padded_tensor", "vllm_halves"])
def test_q_block_tiles_match_the_swizzled_layout(staging_program: Path, shape: tuple[int, int, int, int],
                                                 form: str, threads: int) -> None:
    b, s_q, h_q, h_k = shape
    rng = np.random.default_rng(zlib.crc32(repr((shape, form, threads)).encode()))
    values = rng.integers(0, 1 << 16, (b, s_q, h_q, C.HEAD_DIM_QK), dtype=np.uint16)
    query = {"one_tensor": lambda: one_tensor(values, rng, 0, 0),
             "padded_tensor": lambda: one_tensor(values, rng, 8, 16),
             "vllm_halves": lambda: vllm_halves(values, rng)}[form]()
    got = run_staging(staging_program, query, h_k, threads)
    want = expected_tiles(values, h_k)
    assert len(got) == len(want), f"{len(got)} tile bytes written, expected {len(want)}"
    if got != want:
        diff = np.flatnonzero(np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8))
        tile, at = divmod(int(diff[0]), TILE_BYTES)
        pytest.fail(f"{diff.size} bytes differ; first in tile {tile}, chunk {at // CHUNK_BYTES}, "
                    f"row {at % CHUNK_BYTES // 128}, byte {at % 128}")


def test_the_check_catches_a_wrong_rope_offset(staging_program: Path) -> None:
    """The comparison can fail: a pair whose RoPE half is read one vector off gives other tiles."""
    rng = np.random.default_rng(3)
    values = rng.integers(0, 1 << 16, (2, 1, 16, C.HEAD_DIM_QK), dtype=np.uint16)
    query = vllm_halves(values, rng)
    query.rope_offset = 8  # the staging then reads columns 8-71 of the RoPE half and 8 beyond
    assert run_staging(staging_program, query, 1, 256) != expected_tiles(values, 1)


@pytest.mark.parametrize("token_stride", [576, 1152, 584], ids=["one_kv_head", "two_kv_heads", "padded"])
def test_cp_async_page_copy_matches_the_swizzled_layout(staging_program: Path, token_stride: int) -> None:
    """The cp.async producer's page tile equals the one TMA writes (the GPU tests compare the
    two producers' outputs; this checks the layout itself)."""
    rng = np.random.default_rng(token_stride)
    page = rng.integers(0, 1 << 16, C.PAGE_SIZE * token_stride, dtype=np.uint16)
    got = np.frombuffer(run(staging_program, ["page", token_stride], page.tobytes()), np.uint8)
    want = np.zeros(TILE_BYTES, np.uint8)
    for r in range(C.PAGE_SIZE):
        vectors = page[r * token_stride:r * token_stride + C.HEAD_DIM_QK].view(np.uint8).reshape(72, 16)
        for vec in range(72):
            want[swizzled_at(r, vec):swizzled_at(r, vec) + 16] = vectors[vec]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("first_row", [1, 17, 40, 63])
def test_v_tail_zeroes_only_the_v_rows_past_the_end(staging_program: Path, first_row: int) -> None:
    rng = np.random.default_rng(first_row)
    tile = rng.integers(1, 256, TILE_BYTES, dtype=np.uint8)  # no zero byte: every zero was written
    got = np.frombuffer(run(staging_program, ["vtail", first_row], tile.tobytes()), np.uint8)
    want = tile.copy().reshape(9, C.PAGE_SIZE, 128)
    want[:C.HEAD_DIM_V // 64, first_row:] = 0  # the V chunks' rows; the RoPE chunk is never read as V
    np.testing.assert_array_equal(got, want.reshape(-1))
