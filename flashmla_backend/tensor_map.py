"""TMA descriptors (``CUtensorMap``) for the paged KV cache, encoded through the driver.

The decode kernel takes the map by value as a 128-byte ``__grid_constant__`` parameter; CuPy
passes a NumPy structured scalar of the same size. Encoding is a pure host call (no GPU work),
and maps are cached per cache tensor, so steady-state calls cost a dict lookup.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from ._constants import PAGE_SIZE
from .settings import settings

# CUtensorMap enums (cuda.h).
_DTYPE_CODE = {torch.float16: 6, torch.bfloat16: 9}
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_OOB_FILL_NONE = 0  # out-of-range page ids read zeros

#: Columns per TMA box: 64 bf16/fp16 = 128 bytes, the 128B-swizzle span.
BOX_COLS = 64
#: Token heights a decode source may declare for its boxes: a whole page or half of one.
BOX_TOKEN_HEIGHTS = (PAGE_SIZE // 2, PAGE_SIZE)


def l2_promotion() -> int:
    """The L2 promotion of the KV map: 256B, unless ``FLASHMLA_BACKEND_TMA_L2_PROMOTION``
    (0-3: none, 64B, 128B, 256B) overrides it for an A/B experiment."""
    return settings().tma_l2_promotion



@lru_cache(maxsize=1)
def _libcuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuTensorMapEncodeTiled
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
        ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
    ]
    return lib


def _encode(ptr: int, dtype: torch.dtype, dims: tuple[int, ...], strides_bytes: tuple[int, ...],
            box: tuple[int, ...]) -> bytes:
    rank = len(dims)
    raw = (ctypes.c_uint8 * 128)()
    c_dims = (ctypes.c_uint64 * rank)(*dims)
    c_strides = (ctypes.c_uint64 * (rank - 1))(*strides_bytes)
    c_box = (ctypes.c_uint32 * rank)(*box)
    c_elem = (ctypes.c_uint32 * rank)(*([1] * rank))
    err = _libcuda().cuTensorMapEncodeTiled(
        ctypes.addressof(raw), _DTYPE_CODE[dtype], rank, ctypes.c_void_p(ptr), c_dims, c_strides,
        c_box, c_elem, _INTERLEAVE_NONE, _SWIZZLE_128B, l2_promotion(), _OOB_FILL_NONE)
    if err != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {err} "
                           f"(dims={dims}, strides={strides_bytes}, box={box})")
    return bytes(raw)


_cache: dict[tuple, bytes] = {}


def _cached_map(k_cache: torch.Tensor, dims: tuple[int, ...], strides_bytes: tuple[int, ...],
                box: tuple[int, ...]) -> bytes:
    """``_encode`` over ``k_cache``'s memory, cached by everything the encoding depends on."""
    key = (k_cache.data_ptr(), k_cache.dtype, dims, strides_bytes, box, l2_promotion())
    tmap = _cache.get(key)
    if tmap is None:
        tmap = _encode(k_cache.data_ptr(), k_cache.dtype, dims, strides_bytes, box)
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = tmap
    return tmap


def kv_cache_tensor_map(k_cache: torch.Tensor, box_tokens: int = PAGE_SIZE) -> bytes:
    """Map over ``k_cache [num_pages, 64, h_k, 576]`` as the 4-D tensor
    (576 cols, h_k, 64 tokens, num_pages); one box is 64 cols x 1 head x ``box_tokens`` tokens
    x 1 page (a whole page, unless the decode version declares smaller boxes)."""
    if box_tokens not in BOX_TOKEN_HEIGHTS:
        raise ValueError(f"box_tokens: expected one of {BOX_TOKEN_HEIGHTS}, got {box_tokens}")
    num_pages, page, h_k, d = k_cache.shape
    elem = k_cache.element_size()
    return _cached_map(k_cache, (d, h_k, page, num_pages),
                       (k_cache.stride(2) * elem, k_cache.stride(1) * elem, k_cache.stride(0) * elem),
                       (BOX_COLS, 1, box_tokens, 1))


def kv_cache_group_major_map(k_cache: torch.Tensor, boxes_per_page: int = 1) -> bytes:
    """Map over ``k_cache [num_pages, 64, h_k, 576]`` for token-group-major page tiles (the
    reads of ``benchmarks/read_ceiling.py``'s group-major rows; the decode's v41 used it until run
    34 measured no gain, NOTES.md "v41"): the 5-D tensor (64 cols, 8 tokens, 9 h_k chunks, 8 token groups,
    num_pages), whose box (64, 8, 9, 8 / ``boxes_per_page``, 1) is one head's whole page or half
    of it; its smem image puts the 128B-swizzled atom of (group g, chunk c) at (9 g + c) KB. Head
    kh's chunks start at chunk 9 kh, so with h_k > 1 the heads of a token must lie 576 elements
    apart."""
    if boxes_per_page not in (1, 2):
        raise ValueError(f"boxes_per_page: expected 1 or 2, got {boxes_per_page}")
    num_pages, page, h_k, d = k_cache.shape
    if h_k > 1 and k_cache.stride(2) != d:
        raise ValueError(f"k_cache: with h_k = {h_k} heads this map needs the heads of a token "
                         f"{d} elements apart (stride(2) == {d}), got strides {k_cache.stride()}")
    elem = k_cache.element_size()
    token_bytes = k_cache.stride(1) * elem
    return _cached_map(k_cache, (BOX_COLS, 8, d // BOX_COLS * h_k, page // 8, num_pages),
                       (token_bytes, BOX_COLS * elem, 8 * token_bytes, k_cache.stride(0) * elem),
                       (BOX_COLS, 8, d // BOX_COLS, page // 8 // boxes_per_page, 1))
