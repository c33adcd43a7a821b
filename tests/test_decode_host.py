"""The shipped decode kernel (``kernels/mla_decode.cu``, as NVRTC compiles it) run on the host
emulation of the CUDA model and of its Hopper PTX (``host_simt.hpp``, ``host_ptx.hpp``), then
the combine, against the float32 reference: a functional check of the whole kernel on machines
without a GPU.

Small problems, in the GPU tests' style: poisoned outputs, NaN in unused cache slots and past
each sequence's end, shuffled block tables with garbage ids past each end, empty sequences,
causal s_q > 1 with rows that see no key, two KV heads, 128 heads (two query blocks), split and
unsplit requests, both KV producers (TMA and cp.async) and q as one tensor or as a (latent,
rope) pair of separate buffers. Every global buffer of the harness ends against an inaccessible
page, so a read or write past its end fails the run (a host-side memcheck). The emulation's asynchronous operations complete late, as on the
GPU (``host_ptx.hpp``), so besides addresses, layouts, descriptors, masking, the softmax and the
stores it checks the waits, the hand-offs and the proxy fences after cp.async and stmatrix; not
timing, which the GPU tests (``test_gpu_decode.py``) and the sanitizers cover."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from flashmla_backend import mla_decode_reference
from flashmla_backend.schedule import schedule_reference
from flashmla_backend.testing import make_problem

from conftest import assert_lse_close, relative_error
from host_kernels import (EMULATION, KERNELS, build, compiler_has_float16, definition, host_kernel_source,
                          requires_host_compiler, run)
from test_combine_host import combine_on_host

pytestmark = requires_host_compiler

HOST_PTX = EMULATION.parent / "host_ptx.hpp"
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # test_gpu_decode.py's

HARNESS = r"""
// argv: b s_q h_q h_k num_pages bt_width parts causal scale_log2 producer pair
// stdin: q (uint16 [b, s_q, h_q, 576], or with `pair` the latent [.., 512] then the rope
// [.., 64]), k_cache (uint16 [num_pages, 64, h_k, 576]), block_table (int32 [b, bt_width]),
// seqlens (int32 [b]), metadata (int32 [parts, 8]), num_splits (int32 [b + 1]);
// stdout: out (uint16 [b, s_q, h_q, 512]), lse (f32 [b, h_q, s_q]), o_part, lse_part (f32).

int main(int argc, char** argv) {
    if (argc != 12) return 2;
    const int b = std::atoi(argv[1]), s_q = std::atoi(argv[2]), h_q = std::atoi(argv[3]), h_k = std::atoi(argv[4]);
    const int num_pages = std::atoi(argv[5]), bt_width = std::atoi(argv[6]), parts = std::atoi(argv[7]);
    const int causal = std::atoi(argv[8]);
    const float scale_log2 = float(std::atof(argv[9]));
    const int producer = std::atoi(argv[10]), pair = std::atoi(argv[11]);
    const int rows = s_q * (h_q / h_k), tokens = b * s_q * h_q;
    // Every buffer between guard pages: a read or write past its end faults (host memcheck).
    simt::Guarded<uint16_t> q(size_t(tokens) * (pair ? HEAD_DIM_V : HEAD_DIM_QK));
    simt::Guarded<uint16_t> q_rope(pair ? size_t(tokens) * (HEAD_DIM_QK - HEAD_DIM_V) : 0);
    simt::Guarded<uint16_t> k_cache(size_t(num_pages) * PAGE_SIZE * h_k * HEAD_DIM_QK);
    simt::Guarded<int> block_table(size_t(b) * bt_width), seqlens(b), metadata(size_t(parts) * METADATA_FIELDS),
        num_splits(b + 1);
    if (!read_all(q) || !read_all(q_rope) || !read_all(k_cache) || !read_all(block_table) || !read_all(seqlens) ||
        !read_all(metadata) || !read_all(num_splits))
        return 3;
    const int splits = num_splits[b];
    simt::Guarded<uint16_t> out(size_t(tokens) * HEAD_DIM_V, 0x7FC1);  // poisoned: a bf16 NaN
    simt::Guarded<float> lse(tokens, -12345.f), o_part(size_t(splits) * h_k * rows * HEAD_DIM_V, -12345.f),
        lse_part(size_t(splits) * h_k * rows, -12345.f);

    TensorMap kv_map{};
    const ptx::HostTensorMap host_map{reinterpret_cast<uint64_t>(k_cache.data()),
                                      {HEAD_DIM_QK, uint64_t(h_k), PAGE_SIZE, uint64_t(num_pages)},
                                      {HEAD_DIM_QK * 2ull, uint64_t(h_k) * HEAD_DIM_QK * 2, uint64_t(PAGE_SIZE) * h_k * HEAD_DIM_QK * 2},
                                      {64, 1, PAGE_SIZE, 1}, ptx::HOST_TENSOR_MAP_MAGIC};
    std::memcpy(&kv_map, &host_map, sizeof(host_map));
    const long long width = pair ? HEAD_DIM_V : HEAD_DIM_QK;
    const uint16_t* rope = pair ? q_rope.data() : q.data() + HEAD_DIM_V;
    const long long rope_width = pair ? HEAD_DIM_QK - HEAD_DIM_V : HEAD_DIM_QK;
    const unsigned m_blocks = (rows + BLOCK_M - 1) / BLOCK_M;
    simt::launch({m_blocks, unsigned(h_k), unsigned(parts)}, {DECODE_THREADS, 1, 1}, DECODE_SMEM_BYTES, [&] {
        mla_decode(kv_map, q.data(), s_q * h_q * width, h_q * width, width, block_table.data(), bt_width,
                   seqlens.data(), metadata.data(), num_splits.data(), out.data(), lse.data(), o_part.data(),
                   lse_part.data(), s_q, h_q, h_k, causal, scale_log2, m_blocks == 1, k_cache.data(),
                   PAGE_SIZE * h_k * HEAD_DIM_QK, h_k * HEAD_DIM_QK, producer, rope, s_q * h_q * rope_width,
                   h_q * rope_width, rope_width);
    });
    write_all(out);
    write_all(lse);
    write_all(o_part);
    write_all(lse_part);
    return 0;
}
"""

_ASM_STATEMENT = re.compile(r'asm\s+volatile\s*\(\s*"[^"]*"\s*\)\s*;')


def descriptor_helpers() -> str:
    """ptx_helpers.cuh's wgmma descriptor code (plain C++: the shipped text, not a copy)."""
    helpers = (KERNELS / "ptx_helpers.cuh").read_text()
    atom = re.search(r"^constexpr uint32_t SWIZZLE_ATOM_BYTES = [^;]+;", helpers, re.MULTILINE)
    knob = re.search(r"^#ifndef WGMMA_DESC_BY_OFFSET\n.*?\n#endif", helpers, re.MULTILINE | re.DOTALL)
    assert atom and knob, "SWIZZLE_ATOM_BYTES or WGMMA_DESC_BY_OFFSET not found in ptx_helpers.cuh: update this test"
    parts = [atom.group(0), knob.group(0)] + [definition(helpers, opening, "ptx_helpers.cuh") for opening in (
        r"^DEVICE uint64_t make_smem_desc", r"^DEVICE uint64_t desc_k_major", r"^DEVICE uint64_t desc_mn_major",
        r"^DEVICE uint64_t desc_advance", r"^template <uint32_t MN_CHUNK_BYTES = 0>\nstruct SmemOperand")]
    return "\n\n".join(parts)


VERSIONS = KERNELS.parent / "benchmarks" / "kernel_versions"


def decode_program(source_file: str = "mla_decode.cu") -> str:
    """A decode source for the host (the shipped one, or a kernel_versions/ path): its only
    inline PTX outside ptx_helpers.cuh is setmaxnreg (a register budget, nothing to emulate)."""
    source = host_kernel_source(source_file)
    source, count = _ASM_STATEMENT.subn(";", source)
    assert count >= 2 and "asm" not in re.sub(r"//.*", "", source), \
        f"inline PTX in {source_file} beyond the setmaxnreg statements: emulate it in host_ptx.hpp"
    return "#include <vector>\n" + descriptor_helpers() + "\n" + source + HARNESS


def as_bits(t: torch.Tensor) -> np.ndarray:
    """A 16-bit tensor's raw bits."""
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def decode_on_host(lengths: list[int], s_q: int, h_q: int, h_k: int, parts: int, producer: str, pair: bool,
                   seed: int, scores: str = "random", dtype: torch.dtype = torch.bfloat16,
                   programmatic: bool = False, source_file: str = "mla_decode.cu",
                   knobs: tuple[str, ...] = ()) -> None:
    p = make_problem(lengths, s_q, h_q, h_k, dtype, device="cpu", causal=True, seed=seed)
    if scores != "random":  # a common direction in q and a weight along it in K, as the GPU tests
        p.q.mul_(0.5).add_(1.0)
        for i, n in enumerate(lengths):
            for page in range(-(-n // 64)):
                physical = int(p.block_table[i, page])
                if scores == "rising":  # ~17 log2 units a page: the row max moves on every page
                    weight = (torch.arange(page * 64, page * 64 + 64, dtype=torch.float32) / 128.0).view(64, 1, 1)
                    p.k_cache[physical].mul_(0.5).add_(weight.to(dtype))
                elif page == (n - 1) // 64:  # "spike": one key ~170 log2 units above the rest, last page
                    p.k_cache[physical, (n - 1) % 64].fill_(5.0)
    b = len(lengths)
    rows = s_q * h_q // h_k
    metadata, num_splits = schedule_reference(p.cache_seqlens, parts)
    scale = 576 ** -0.5
    q = as_bits(p.q)
    q_parts = [q[..., :512], q[..., 512:]] if pair else [q]
    stdin = b"".join(np.ascontiguousarray(a).tobytes() for a in (
        *q_parts, as_bits(p.k_cache), p.block_table.numpy().astype(np.int32), p.cache_seqlens.numpy().astype(np.int32),
        metadata.numpy(), num_splits.numpy()))
    args = [b, s_q, h_q, h_k, p.k_cache.shape[0], p.block_table.shape[1], parts, 1, repr(scale * 1.4426950408889634),
            int(producer == "cp_async"), int(pair)]
    defines = ("-O2",) + (("-DMLA_FP16",) if dtype == torch.float16 else ()) + (
        ("-DMLA_PROGRAMMATIC_LAUNCH",) if programmatic else ()) + knobs
    result = run(build(decode_program(source_file), defines, HOST_PTX), args, stdin)

    splits = int(num_splits[-1])
    shapes = [((b, s_q, h_q, 512), np.uint16), ((b, h_q, s_q), np.float32), ((splits, h_k, rows, 512), np.float32),
              ((splits, h_k, rows), np.float32)]
    arrays, offset = [], 0
    for shape, element in shapes:
        size = int(np.prod(shape)) * np.dtype(element).itemsize
        arrays.append(np.frombuffer(result[offset:offset + size], element).reshape(shape))
        offset += size
    assert offset == len(result), "the decode harness wrote the wrong amount"
    out, lse, o_part, lse_part = arrays
    if dtype == torch.bfloat16:  # the combine writes bf16 (host_simt.hpp builds it so)
        out, lse = combine_on_host(num_splits.numpy(), o_part, lse_part, out, lse, warps_per_row=1,
                                   requests_per_cta=1, programmatic=programmatic)
    else:
        assert int(num_splits[-1]) == b, "the fp16 cases must not split (the host combine is bf16)"

    got = torch.from_numpy(out.astype(np.int16)).view(dtype).float()
    ref, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, causal=True)
    err = relative_error(got, ref.float())
    assert err < TOLERANCE[dtype], f"relative error {err:.3e}"
    assert_lse_close(torch.from_numpy(lse.copy()), ref_lse)


CASES = [
    # (lengths, s_q, h_q, h_k, parts)
    ([130, 0, 333], 1, 16, 1, 3),           # one request per part, an empty one
    ([130, 0, 333], 1, 16, 1, 8),           # split requests (the combine merges them)
    ([200], 1, 128, 1, 2),                  # two query blocks of 64 heads
    ([1, 90, 64], 2, 16, 1, 4),             # causal MTP rows; a 1-key request sees nothing at s = 0
    ([2, 70], 4, 3, 1, 3),                  # odd head count; rows with no key at all
    ([100, 150], 1, 32, 2, 2),              # two KV heads
]


@pytest.mark.parametrize("producer", ["tma", "cp_async"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "len{}_sq{}_hq{}_hk{}_parts{}".format(
    "-".join(map(str, c[0])), *c[1:]))
def test_decode_on_the_host_matches_the_reference(case: tuple, producer: str) -> None:
    lengths, s_q, h_q, h_k, parts = case
    decode_on_host(lengths, s_q, h_q, h_k, parts, producer, pair=False, seed=len(lengths) + h_q)


@pytest.mark.parametrize("scores", ["rising", "spike"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=["split_requests", "two_query_blocks"])
def test_decode_on_the_host_rescales_and_redoes_pages(case: tuple, scores: str) -> None:
    """Rows whose max rises by more than the kept-max threshold on every page (both warpgroups
    rescale O), and a last key far above the kept max (the page is redone with its own max)."""
    lengths, s_q, h_q, h_k, parts = case
    decode_on_host(lengths, s_q, h_q, h_k, parts, "tma", pair=False, seed=11, scores=scores)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=["split_requests", "mtp"])
def test_decode_on_the_host_reads_q_as_a_pair(case: tuple) -> None:
    lengths, s_q, h_q, h_k, parts = case
    decode_on_host(lengths, s_q, h_q, h_k, parts, "tma", pair=True, seed=7)



def test_decode_on_the_host_programmatic_build() -> None:
    """The build the API launches by default (programmatic dependent launch: the dependents are
    released after the first page is issued), with its programmatic combine."""
    lengths, s_q, h_q, h_k, parts = CASES[3]
    decode_on_host(lengths, s_q, h_q, h_k, parts, "tma", pair=False, seed=5, programmatic=True)


@pytest.mark.skipif(not compiler_has_float16(), reason="the host compiler has no _Float16 (GCC 12+ or Clang)")
@pytest.mark.parametrize("producer", ["tma", "cp_async"])
def test_decode_on_the_host_fp16(producer: str) -> None:
    """fp16 q and cache (MLA_FP16), one request per part (the host combine is built for bf16)."""
    decode_on_host([130, 0, 333], 2, 16, 1, 3, producer, pair=False, seed=3, dtype=torch.float16)


V43 = str(VERSIONS / "mla_decode_v43_heads_on_n.cu")


@pytest.mark.parametrize("producer", ["tma", "cp_async"])
@pytest.mark.parametrize("case", [c for c in CASES if c[1] * c[2] // c[3] <= 32],
                         ids=lambda c: "len{}_sq{}_hq{}_hk{}_parts{}".format("-".join(map(str, c[0])), *c[1:]))
def test_v43_heads_on_n_on_the_host(case: tuple, producer: str) -> None:
    """benchmarks/kernel_versions' v43 (query rows on the wgmma N dimension, at most 32 rows per
    KV head), before any GPU has run it."""
    lengths, s_q, h_q, h_k, parts = case
    decode_on_host(lengths, s_q, h_q, h_k, parts, producer, pair=False, seed=len(lengths) + h_q, source_file=V43)


@pytest.mark.parametrize("scores", ["rising", "spike"])
def test_v43_rescales_and_redoes_pages_on_the_host(scores: str) -> None:
    lengths, s_q, h_q, h_k, parts = CASES[1]
    decode_on_host(lengths, s_q, h_q, h_k, parts, "tma", pair=True, seed=13, scores=scores, source_file=V43)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=["h16", "mtp"])
def test_v43_p_by_single_stores_on_the_host(case: tuple) -> None:
    """v43's fallback knob P_BY_STMATRIX=0 (P^T element by element instead of stmatrix.trans)."""
    lengths, s_q, h_q, h_k, parts = case
    decode_on_host(lengths, s_q, h_q, h_k, parts, "tma", pair=False, seed=17, source_file=V43,
                   knobs=("-DP_BY_STMATRIX=0",))


@pytest.mark.skipif(not compiler_has_float16(), reason="the host compiler has no _Float16 (GCC 12+ or Clang)")
def test_v43_fp16_on_the_host() -> None:
    decode_on_host([130, 0, 333], 2, 16, 1, 3, "tma", pair=False, seed=3, dtype=torch.float16,
                   programmatic=True, source_file=V43)


def random_case(seed: int) -> tuple:
    """A seeded random shape: 1-4 requests of 0-400 keys, s_q 1-4 (causal), h_q from 1 to 128
    (rows past a 64-row block included), one or two KV heads, 1-12 parts, either producer."""
    rng = np.random.default_rng(1000 + seed)
    h_k = int(rng.choice([1, 1, 2]))
    s_q = int(rng.integers(1, 5))
    group = int(rng.choice([1, 3, 5, 16, 24, 48, 64, 96, 128]))
    while s_q * group > 256:
        s_q -= 1
    lengths = [int(n) for n in rng.integers(0, 401, int(rng.integers(1, 5)))]
    return lengths, s_q, group * h_k, h_k, int(rng.integers(1, 13)), str(rng.choice(["tma", "cp_async"]))


@pytest.mark.parametrize("seed", range(8))
def test_decode_on_the_host_random_shapes(seed: int) -> None:
    lengths, s_q, h_q, h_k, parts, producer = random_case(seed)
    decode_on_host(lengths, s_q, h_q, h_k, parts, producer, pair=bool(seed % 2), seed=seed)


def test_every_ptx_helper_has_a_host_emulation() -> None:
    """A wrapper added to ptx_helpers.cuh needs its emulation in host_ptx.hpp / host_simt.hpp (or
    is plain C++ the host tests take from the header as it is), unless no decode uses it."""
    helpers = (KERNELS / "ptx_helpers.cuh").read_text()
    names = set(re.findall(r"^DEVICE [\w ]+?\b(\w+)\(", helpers, re.MULTILINE))
    emulated = (EMULATION.read_text() + HOST_PTX.read_text())
    taken_as_is = {"make_smem_desc", "desc_k_major", "desc_mn_major", "desc_advance"}  # descriptor_helpers()
    decode_text = "".join(p.read_text() for p in [*KERNELS.glob("mla_decode*"), *KERNELS.glob("mla_kv_*"),
                                                  KERNELS / "mla_softmax.cuh", *VERSIONS.glob("mla_decode_v*.cu")])
    missing = sorted(n for n in names - taken_as_is
                     if not re.search(rf"\b{n}\(", emulated) and re.search(rf"\b{n}\b", decode_text))
    assert not missing, f"ptx_helpers.cuh wrappers a decode uses without a host emulation: {missing}"
    assert len(names) > 30, "the helper list was not read"
