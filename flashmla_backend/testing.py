"""Random decode problems for tests, benchmarks and examples.

Inputs follow the project's testing standard: fresh random values (never zeros), a shuffled
block table, NaN in every unused cache slot (whole spare pages and the tail of each last
page), and garbage page ids past each sequence's end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._constants import HEAD_DIM_QK, PAGE_SIZE


@dataclass
class DecodeProblem:
    """One batch: ``q [b, s_q, h_q, 576]``, ``k_cache [pages, 64, h_k, 576]``,
    ``block_table [b, max_pages]`` int32, ``cache_seqlens [b]`` int32."""

    q: torch.Tensor
    k_cache: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    causal: bool

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, s_q, h_q, _ = self.q.shape
        return b, s_q, h_q, self.k_cache.shape[2]

    def kv_bytes(self) -> int:
        """Bytes of KV actually read (FlashMLA's formula counts each used key once)."""
        return int(self.cache_seqlens.sum()) * self.k_cache.shape[2] * HEAD_DIM_QK * self.q.element_size()


def draw_lengths(batch: int, s_k: int, varlen: bool, generator: torch.Generator,
                 with_zeros: bool = False) -> list[int]:
    """Fixed ``s_k``, or uniform in ``[s_k/2, 3*s_k/2]``; ``with_zeros`` empties some sequences."""
    if not varlen:
        lengths = [s_k] * batch
    else:
        lo, hi = max(1, s_k // 2), max(1, (3 * s_k) // 2)
        lengths = torch.randint(lo, hi + 1, (batch,), generator=generator).tolist()
    if with_zeros and batch > 1:
        for i in range(0, batch, 3):
            lengths[i] = 0
    return lengths


def make_problem(
    lengths: list[int],
    s_q: int,
    h_q: int,
    h_k: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    causal: bool = True,
    seed: int = 0,
    poison: bool = True,
    spare_pages: int = 3,
) -> DecodeProblem:
    """Builds a poisoned, shuffled paged-KV problem for the given sequence lengths."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    pages_per_seq = [-(-n // PAGE_SIZE) for n in lengths]
    used_pages = sum(pages_per_seq)
    num_pages = used_pages + spare_pages
    width = max(pages_per_seq) + 2

    device = torch.device(device)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, s_q, h_q, HEAD_DIM_QK, generator=dev_gen, device=device, dtype=dtype)
    k_cache = torch.randn(num_pages, PAGE_SIZE, h_k, HEAD_DIM_QK, generator=dev_gen, device=device, dtype=dtype)
    order = torch.randperm(num_pages, generator=gen)
    # Garbage past each end: ids far out of range, negative, or pointing at poisoned pages.
    block_table = torch.randint(-(2**30), 2**30, (batch, width), generator=gen, dtype=torch.int32)
    cursor = 0
    for i, n_pages in enumerate(pages_per_seq):
        block_table[i, :n_pages] = order[cursor:cursor + n_pages].to(torch.int32)
        cursor += n_pages
    if poison:
        k_cache[order[used_pages:].to(device)] = float("nan")
        for i, n in enumerate(lengths):
            if n % PAGE_SIZE:
                k_cache[int(block_table[i, pages_per_seq[i] - 1]), n % PAGE_SIZE:] = float("nan")
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    return DecodeProblem(q, k_cache, block_table.to(device), seqlens.to(device), causal)


def capture_decode_step(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                        cache_seqlens: torch.Tensor, causal: bool = True
                        ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
    """A CUDA graph of one decode step (``get_mla_metadata`` then ``flash_mla_with_kvcache``) on
    these static tensors, warmed up on a side stream first as capture requires. Returns the graph
    and its output ``[b, s_q, h_q, 512]`` and LSE ``[b, h_q, s_q]``, rewritten by each replay."""
    from .api import flash_mla_with_kvcache, get_mla_metadata
    from .runtime import precompile

    precompile()
    _, s_q, h_q, _ = q.shape
    rows = s_q * h_q // k_cache.shape[2]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        md, ns = get_mla_metadata(cache_seqlens, rows, k_cache.shape[2])
        flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, md, ns, causal=causal)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        md, ns = get_mla_metadata(cache_seqlens, rows, k_cache.shape[2])
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, md, ns, causal=causal)
    return graph, out, lse
