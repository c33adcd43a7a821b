"""flashmla_backend: FlashMLA-compatible paged MLA decode for Hopper, compiled at run time.

Public API:
    get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
    flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                           tile_scheduler_metadata, num_splits, softmax_scale=None, causal=False)
    precompile(device=None)     build every kernel variant before CUDA-graph capture
    reserve_workspace(...)      size the split workspace before CUDA-graph capture
    mla_decode_reference(...)   the float32 spec (runs anywhere)
"""

from .api import flash_mla_with_kvcache, get_mla_metadata, reserve_workspace
from .reference import mla_decode_reference
from .runtime import UnsupportedDeviceError, precompile

__version__ = "0.1.0"

__all__ = [
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "mla_decode_reference",
    "precompile",
    "reserve_workspace",
    "UnsupportedDeviceError",
    "__version__",
]
