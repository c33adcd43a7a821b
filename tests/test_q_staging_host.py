"""The decode's Q staging (``load_q_block`` in ``kernels/mla_decode_shared.cuh``), compiled for the
host and checked byte for byte against the swizzled tile layout, on machines without a GPU.

The kernel copies each 64-row Q block into shared memory as nine 128-byte-swizzled 8 KB chunks:
16-byte vector ``v`` of row ``r`` lands at ``(v // 8) * 8192 + r * 128 + ((v % 8) ^ (r % 8)) * 16``,
and rows past the block's valid rows are zero. The latent columns (vectors 0-63) and the RoPE
columns (64-71) come from two pointers with their own strides (``QSource``); one ``[.., 576]``
tensor is the case ``rope = latent + 512`` with the same strides. This test takes the device
functions' own text out of the header, compiles it with a host C++ compiler (the ``cp.async``
becomes a 16-byte copy or zero fill), runs every thread's loop and compares the tile with the
layout computed here in numpy. The GPU tests (``test_split_query.py``) check the same path
end to end on a Hopper GPU.
"""

from __future__ import annotations

import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from flashmla_backend import _constants as C

from host_kernels import COMPILER, KERNELS, constant, definition, requires_host_compiler

pytestmark = requires_host_compiler

CHUNK_BYTES = C.PAGE_SIZE * 64 * 2
TILE_BYTES = (C.HEAD_DIM_QK // 64) * CHUNK_BYTES


HARNESS = r"""
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#define DEVICE inline
%(constants)s
inline void cp_async_16_or_zero(void* dst, const void* src, bool valid) {
    if (valid) std::memcpy(dst, src, 16); else std::memset(dst, 0, 16);
}
%(definitions)s

// argv: threads b s_q h_q h_k latent_strides(3) rope_strides(3) latent_elems rope_elems
// stdin: the latent then the rope buffer (uint16); stdout: every (req, kh, row block) tile in order.
int main(int argc, char** argv) {
    if (argc != 14) return 2;
    long long v[13];
    for (int i = 0; i < 13; ++i) v[i] = std::atoll(argv[i + 1]);
    const int threads = int(v[0]), b = int(v[1]), s_q = int(v[2]), h_q = int(v[3]), h_k = int(v[4]);
    std::vector<uint16_t> latent(v[11]), rope(v[12]);
    if (std::fread(latent.data(), 2, latent.size(), stdin) != latent.size()) return 3;
    if (std::fread(rope.data(), 2, rope.size(), stdin) != rope.size()) return 3;
    const QSource q{latent.data(), v[5], v[6], v[7], rope.data(), v[8], v[9], v[10]};
    const RowMap rows{s_q * (h_q / h_k), h_q / h_k};
    std::vector<uint8_t> tile(TILE_BYTES);
    for (int req = 0; req < b; ++req)
        for (int kh = 0; kh < h_k; ++kh)
            for (int row_base = 0; row_base < rows.rows; row_base += BLOCK_M) {
                std::memset(tile.data(), 0xA5, tile.size());  // poison: every byte must be written
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
def staging_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The header's Q staging code built into a host program."""
    shared = (KERNELS / "mla_decode_shared.cuh").read_text()
    common = (KERNELS / "mla_common.cuh").read_text()
    constants = [constant(common, n) for n in ("HEAD_DIM_QK", "HEAD_DIM_V", "PAGE_SIZE", "BLOCK_M")]
    constants += [constant(shared, n) for n in ("CHUNK_COLS", "CHUNK_BYTES", "QK_CHUNKS", "TILE_BYTES",
                                                  "WG_THREADS", "CONSUMER_THREADS", "Q_LATENT_VECS",
                                                  "Q_ROPE_VECS")]
    definitions = [definition(shared, r"^struct RowMap \{"), definition(shared, r"^struct QSource \{"),
                   definition(shared, r"^template <int THREADS, int FIRST_VEC, int VECS>\nDEVICE void copy_q_columns"),
                   definition(shared, r"^template <int THREADS = CONSUMER_THREADS>\nDEVICE void load_q_block")]
    folder = tmp_path_factory.mktemp("q_staging")
    source = folder / "q_staging.cpp"
    source.write_text(HARNESS % {"constants": "\n".join(constants), "definitions": "\n\n".join(definitions)})
    binary = folder / "q_staging"
    build = subprocess.run([COMPILER, "-std=c++17", "-O1", "-Wall", "-Werror", str(source), "-o", str(binary)],
                           capture_output=True, text=True)
    assert build.returncode == 0, f"host build of the Q staging failed:\n{build.stderr}"
    return binary


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
                        at = (vec // 8) * CHUNK_BYTES + r * 128 + (((vec % 8) ^ (r % 8)) * 16)
                        tile[at:at + 16] = vectors[vec]
                out.append(tile.tobytes())
    return b"".join(out)


def run_staging(program: Path, query: Query, h_k: int, threads: int) -> bytes:
    b, s_q, h_q, _ = query.values.shape
    rope = query.rope[query.rope_offset:]
    args = [threads, b, s_q, h_q, h_k, *query.latent_strides, *query.rope_strides, query.latent.size, rope.size]
    result = subprocess.run([str(program), *map(str, args)], input=query.latent.tobytes() + rope.tobytes(),
                            capture_output=True)
    assert result.returncode == 0, f"the staging harness exited with {result.returncode}"
    return result.stdout


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
