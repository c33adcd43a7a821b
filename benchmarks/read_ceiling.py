"""The device's read-only DRAM rate beside its copy rate, on the card at hand.

Decode only reads the cache, so the device copy rate (read + write, the bench's ceiling) is not
a hard wall for it. This diagnostic asks how far above it a kernel that only reads can go: a
sweep of plain 16-byte loads (loads in flight per thread, CTAs per SM, interleaved or one
contiguous slice per CTA), of 1-D bulk copies (TMA, no tensor map) into an smem ring nobody
consumes, and of whole 72 KB cache pages in block-table order (in order or shuffled) the way the
decode's producer streams them (one bulk copy per page, its nine 64-column TMA boxes, or one 5-D
box whose smem image is token-group major), over a
2 GiB buffer (40x the L2), L2 flushed before each call.

    python benchmarks/read_ceiling.py [--iters 20] [--gib 2] [--engines pages,tiles,groups]

Prints one line per variant (µs, GB/s, % of copy) and the best read rate last.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import cupy as cp
import numpy as np
import torch

from flashmla_backend.bench import Timer, measure_ceilings
from flashmla_backend.kernel_sources import assembled_source
from flashmla_backend.tensor_map import kv_cache_group_major_map, kv_cache_tensor_map

LOAD_SOURCE = r"""
// Reads n_vec 16-byte vectors and folds them into one word, so no load is dead code.
__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

extern "C" __global__ void read_by_loads(const uint4* __restrict__ src, unsigned long long n_vec,
                                         unsigned* sink) {
#if CONTIGUOUS
    // One contiguous slice per CTA, as a decode CTA reads its own pages.
    const unsigned long long slice = n_vec / gridDim.x;
    const uint4* base = src + blockIdx.x * slice;
    const unsigned long long stride = blockDim.x, count = slice;
    unsigned long long i = threadIdx.x;
#else
    const uint4* base = src;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x, count = n_vec;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
#endif
    unsigned acc = 0;
    for (; i + (UNROLL - 1) * stride < count; i += UNROLL * stride) {
        uint4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) v[u] = load_streaming(base + i + u * stride);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < count; i += stride) {
        const uint4 v = load_streaming(base + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9E3779B9u) atomicAdd(sink, 1u);
}
"""

# The project's PTX wrappers (mbarrier, TMA, the sm_90a guard) and a 1-D bulk copy, which the
# decode does not use.
RING_HELPERS = assembled_source("ptx_helpers.cuh") + r"""
DEVICE void bulk_load_1d(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}
"""

BULK_SOURCE = RING_HELPERS + r"""
// One thread keeps STAGES chunks of CHUNK bytes in flight over its CTA's contiguous slice;
// the ring's contents are never read (the copy engine's rate alone).
extern "C" __global__ void read_by_bulk(const char* __restrict__ src, uint64_t chunks_per_cta) {
    extern __shared__ __align__(128) char ring[];
    __shared__ uint64_t full[STAGES];
    if (threadIdx.x != 0) return;
    for (int s = 0; s < STAGES; ++s) mbarrier_init(&full[s], 1);
    fence_barrier_init();
    const char* base = src + blockIdx.x * chunks_per_cta * CHUNK;
    for (uint64_t c = 0; c < chunks_per_cta && c < STAGES; ++c) {
        mbarrier_arrive_expect_tx(&full[c], CHUNK);
        bulk_load_1d(ring + c * CHUNK, base + c * CHUNK, CHUNK, &full[c]);
    }
    for (uint64_t c = 0; c < chunks_per_cta; ++c) {
        const int s = c % STAGES;
        mbarrier_wait(&full[s], (c / STAGES) & 1);
        const uint64_t next = c + STAGES;
        if (next < chunks_per_cta) {
            mbarrier_arrive_expect_tx(&full[s], CHUNK);
            bulk_load_1d(ring + s * CHUNK, base + next * CHUNK, CHUNK, &full[s]);
        }
    }
}
"""

# The decode's access pattern without its math: one thread per CTA streams its run of cache pages
# (72 KB each, in block-table order) through a ring of STAGES page slots, either as one 1-D bulk
# copy per page, as the decode's nine 64-column x 64-token TMA boxes (128B swizzle), or as one
# 5-D box per page whose smem image is token-group major: the 1 KB swizzle atom of (8 tokens, 64
# columns) for token group g and chunk c at (9 g + c) KB, so the box walks each 8-token group's
# 9 KB of the page before the next one's (the nine boxes each walk all 72 KB), or as two such
# boxes of half a page each.
PAGE_SOURCE = RING_HELPERS + r"""
constexpr uint32_t PAGE_BYTES = 64 * 576 * 2;

DEVICE void load_page(char* slot, const char* cache, const void* tensor_map, int page, uint64_t* bar) {
    mbarrier_arrive_expect_tx(bar, PAGE_BYTES);
#if GROUPS
    // GROUPS token groups per box: 8 (one box a page) or 4 (two half pages, 36 KB each).
    for (int g = 0; g < 8; g += GROUPS)
        tma_load_5d(slot + g * 9 * 1024, tensor_map, bar, 0, 0, 0, g, page, l2_policy_evict_first());
#elif TILES
    constexpr uint32_t BOX_BYTES = 64 * 64 * 2;  // one 64-column x 64-token box
    for (int c = 0; c < 9; ++c)
        tma_load_4d(slot + c * BOX_BYTES, tensor_map, bar, c * 64, 0, 0, page, l2_policy_evict_first());
#else
    bulk_load_1d(slot, cache + (uint64_t)page * PAGE_BYTES, PAGE_BYTES, bar);
#endif
}

extern "C" __global__ void read_pages(const char* __restrict__ cache, const void* tensor_map,
                                      const int* __restrict__ page_ids, int pages_per_cta) {
    extern __shared__ __align__(1024) char ring[];
    __shared__ uint64_t full[STAGES];
    if (threadIdx.x != 0) return;
    for (int s = 0; s < STAGES; ++s) mbarrier_init(&full[s], 1);
    fence_barrier_init();
    const int* pages = page_ids + (long long)blockIdx.x * pages_per_cta;
    for (int i = 0; i < pages_per_cta && i < STAGES; ++i)
        load_page(ring + i * PAGE_BYTES, cache, tensor_map, pages[i], &full[i]);
    for (int i = 0; i < pages_per_cta; ++i) {
        const int s = i % STAGES;
        mbarrier_wait(&full[s], (i / STAGES) & 1);
        if (i + STAGES < pages_per_cta)
            load_page(ring + s * PAGE_BYTES, cache, tensor_map, pages[i + STAGES], &full[s]);
    }
}
"""


# One page by the 5-D box (or two half-page boxes) into smem, then smem out to global byte for
# byte: where the boxes put each element (tests/test_read_ceiling.py compares it with the
# group-major swizzled layout).
GROUP_IMAGE_SOURCE = RING_HELPERS + r"""
extern "C" __global__ void group_box_image(const void* tensor_map, int page, int groups_per_box, uint4* image) {
    extern __shared__ __align__(1024) uint4 slot[];
    __shared__ uint64_t full;
    constexpr int PAGE_VECS = 64 * 576 * 2 / 16;
    if (threadIdx.x == 0) {
        mbarrier_init(&full, 1);
        fence_barrier_init();
        mbarrier_arrive_expect_tx(&full, PAGE_VECS * 16);
        for (int g = 0; g < 8; g += groups_per_box)
            tma_load_5d(slot + g * 9 * 1024 / 16, tensor_map, &full, 0, 0, 0, g, page, l2_policy_evict_first());
    }
    __syncthreads();
    mbarrier_wait(&full, 0);
    for (int i = threadIdx.x; i < PAGE_VECS; i += blockDim.x) image[i] = slot[i];
}
"""


def group_major_offset(token: int, col: int) -> int:
    """Byte offset in the group-major page image of (token, column): atom (token // 8, col // 64)
    at (9 (token // 8) + col // 64) KB, rows of 128 bytes, 16-byte units swizzled by the row."""
    group, row, chunk, unit = token // 8, token % 8, col // 64, (col % 64) // 8
    return (9 * group + chunk) * 1024 + row * 128 + ((unit ^ row) << 4) + (col % 8) * 2


@dataclass(frozen=True)
class Variant:
    """One read kernel configuration."""
    engine: str            # "loads", "bulk" (1-D copies), "pages", "tiles", "groups" or "halfgroups" (cache pages)
    ctas_per_sm: int
    unroll: int = 0        # loads: 16-byte loads in flight per thread
    contiguous: bool = False
    chunk: int = 0         # bulk: bytes per copy
    stages: int = 0        # bulk, pages, tiles: copies (pages) in flight per CTA
    shuffled: bool = False  # pages, tiles: block-table order shuffled

    @property
    def label(self) -> str:
        if self.engine == "loads":
            layout = "contiguous" if self.contiguous else "interleaved"
            return f"loads x{self.unroll}, {self.ctas_per_sm} CTA/SM x 512 thr, {layout}"
        if self.engine == "bulk":
            return f"bulk {self.chunk // 1024} KB x {self.stages} stages, {self.ctas_per_sm} CTA/SM"
        order = "shuffled" if self.shuffled else "in order"
        how = {"pages": "one bulk copy", "tiles": "9 TMA boxes", "groups": "one 5-D group-major box",
               "halfgroups": "2 half-page group-major boxes"}[self.engine]
        return f"pages by {how} each, {self.stages} stages, 1 CTA/SM, {order}"


VARIANTS = (
    [Variant("loads", c, unroll=u, contiguous=k) for u in (4, 8) for c in (2, 4) for k in (False, True)]
    + [Variant("bulk", 1, chunk=16384, stages=8), Variant("bulk", 1, chunk=32768, stages=4),
       Variant("bulk", 1, chunk=32768, stages=6), Variant("bulk", 2, chunk=16384, stages=6)]
    + [Variant(e, 1, stages=st, shuffled=sh) for e in ("pages", "tiles", "groups", "halfgroups") for st in (2, 3) for sh in (False, True)]
)
PAGE_BYTES = 64 * 576 * 2
#: Group-major boxes a page, by engine.
GROUP_BOXES_PER_PAGE = {"groups": 1, "halfgroups": 2}


def group_tokens_per_box(engine: str) -> int:
    """Tokens per group-major box of ``engine`` (0 for the other engines)."""
    return 64 // GROUP_BOXES_PER_PAGE[engine] if engine in GROUP_BOXES_PER_PAGE else 0


class TorchStream:
    """CuPy's ``stream=``: torch's current stream by its raw pointer."""

    def __init__(self, device_index: int) -> None:
        self.ptr = torch._C._cuda_getCurrentRawStream(device_index)


def kernel_source(variant: Variant) -> tuple[str, str, tuple[str, ...], int]:
    """``(source, kernel name, NVRTC options, dynamic smem bytes)`` of ``variant``."""
    options = ("-arch=sm_90a", "-std=c++17")
    if variant.engine == "loads":
        defines = (f"-DUNROLL={variant.unroll}", f"-DCONTIGUOUS={int(variant.contiguous)}")
        return LOAD_SOURCE, "read_by_loads", options + defines, 0
    if variant.engine == "bulk":
        defines = (f"-DCHUNK={variant.chunk}", f"-DSTAGES={variant.stages}")
        return BULK_SOURCE, "read_by_bulk", options + defines, variant.chunk * variant.stages
    defines = (f"-DTILES={int(variant.engine == 'tiles')}", f"-DGROUPS={group_tokens_per_box(variant.engine) // 8}",
               f"-DSTAGES={variant.stages}")
    return PAGE_SOURCE, "read_pages", options + defines, PAGE_BYTES * variant.stages


def build(variant: Variant):
    """The compiled kernel function of ``variant``."""
    source, name, options, shared = kernel_source(variant)
    kernel = cp.RawModule(code=source, options=options).get_function(name)
    if shared > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = shared
    return kernel


def page_call(variant: Variant, kernel, stream: TorchStream, buffer: torch.Tensor, sms: int):
    """``(call, bytes_read)`` of a pages or tiles variant: ``buffer`` viewed as a bf16 cache
    ``[num_pages, 64, 1, 576]``, each of ``sms`` CTAs reading its run of a block table."""
    cache = buffer[: buffer.numel() // PAGE_BYTES * PAGE_BYTES].view(torch.bfloat16).view(-1, 64, 1, 576)
    pages_per_cta = cache.shape[0] // sms
    order = torch.randperm(cache.shape[0]) if variant.shuffled else torch.arange(cache.shape[0])
    page_ids = order[: pages_per_cta * sms].to(torch.int32).to(buffer.device)
    boxes = GROUP_BOXES_PER_PAGE.get(variant.engine)
    raw_map = kv_cache_group_major_map(cache, boxes) if boxes else kv_cache_tensor_map(cache)
    tensor_map = torch.frombuffer(bytearray(raw_map), dtype=torch.uint8).to(buffer.device)
    args = (cache.data_ptr(), tensor_map.data_ptr(), page_ids.data_ptr(), np.int32(pages_per_cta))
    shared = PAGE_BYTES * variant.stages

    def call() -> None:
        kernel((sms,), (32,), args, shared_mem=shared, stream=stream)

    call.keep_alive = (page_ids, tensor_map)  # the buffers behind args' pointers
    return call, pages_per_cta * sms * PAGE_BYTES


def make_call(variant: Variant, buffer: torch.Tensor, sink: torch.Tensor, sms: int):
    """``(call, bytes_read)`` for ``variant`` over ``buffer`` (uint8, on the GPU)."""
    kernel, stream = build(variant), TorchStream(buffer.device.index)
    if variant.engine in ("pages", "tiles", *GROUP_BOXES_PER_PAGE):
        return page_call(variant, kernel, stream, buffer, sms)
    grid = variant.ctas_per_sm * sms
    if variant.engine == "loads":
        n_vec = buffer.numel() // 16
        if variant.contiguous:
            n_vec = n_vec // grid * grid
        args = (buffer.data_ptr(), np.uint64(n_vec), sink.data_ptr())
        return (lambda: kernel((grid,), (512,), args, stream=stream)), n_vec * 16
    chunks = buffer.numel() // variant.chunk // grid
    shared = variant.chunk * variant.stages
    args = (buffer.data_ptr(), np.uint64(chunks))
    return (lambda: kernel((grid,), (32,), args, shared_mem=shared, stream=stream)), chunks * grid * variant.chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--engines", default="loads,bulk,pages,tiles,groups,halfgroups",
                        help="comma-separated engines to run (default: all)")
    args = parser.parse_args()
    engines = set(args.engines.split(","))
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    timer = Timer(args.iters)
    copy = measure_ceilings(timer)["copy_GBps"]
    buffer = torch.randint(0, 255, (int(args.gib * (1 << 30)),), dtype=torch.uint8, device=device)
    sink = torch.zeros(1, dtype=torch.int32, device=device)
    print(f"## {props.name}: copy {copy:.0f} GB/s (read + write, the bench's ceiling), "
          f"{args.gib:g} GiB read per call, median of {args.iters}")
    print("| variant | µs | GB/s | % of copy |\n|---|---|---|---|")
    best = (0.0, "")
    for variant in (v for v in VARIANTS if v.engine in engines):
        call, nbytes = make_call(variant, buffer, sink, props.multi_processor_count)
        us = timer.median_us(call)
        rate = nbytes / us / 1e3
        best = max(best, (rate, variant.label))
        print(f"| {variant.label} | {us:.1f} | {rate:.0f} | {100 * rate / copy:.1f}% |", flush=True)
    torch.cuda.synchronize()
    print(f"\nBest read rate: {best[0]:.0f} GB/s ({100 * best[0] / copy:.1f}% of copy), {best[1]}")


if __name__ == "__main__":
    main()
