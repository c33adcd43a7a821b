"""What the vLLM backend supports, stated without importing vLLM.

``backend.py`` builds its vLLM class attributes from these constants, and the CPU tests check
them, so the declared capabilities live in one place that imports without vLLM or a GPU.
"""

from __future__ import annotations

import torch

from .._constants import HEAD_DIM_QK, HEAD_DIM_V, PAGE_SIZE

#: The name vLLM users pass: ``--attention-backend CUSTOM`` or ``attention_config={"backend": "CUSTOM"}``.
BACKEND_NAME = "CUSTOM"

#: Dotted path that ``register()`` hands to ``register_backend(AttentionBackendEnum.CUSTOM, ...)``.
BACKEND_CLASS_PATH = "flashmla_backend.vllm_plugin.backend.FlashMLACompatBackend"

#: Tokens per KV page of the kernel; vLLM splits larger cache blocks into pages of this size.
KERNEL_BLOCK_SIZE = PAGE_SIZE

#: Kernel block sizes declared through ``get_supported_kernel_block_sizes()``.
KERNEL_BLOCK_SIZES: tuple[int, ...] = (KERNEL_BLOCK_SIZE,)

#: MLA head size of the cache rows: 512 latent (``kv_lora_rank``) + 64 RoPE.
HEAD_SIZE = HEAD_DIM_QK

#: ``kv_lora_rank``, the width of the attention output and of V.
KV_LORA_RANK = HEAD_DIM_V

#: Activation dtypes of the model.
SUPPORTED_MODEL_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)

#: ``--kv-cache-dtype`` values accepted; "auto" means the model dtype.
SUPPORTED_KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "float16", "bfloat16")

#: (major, minor) compute capability the kernels are built for: Hopper, sm_90.
SUPPORTED_COMPUTE_CAPABILITY = (9, 0)

#: Printed once per process by the metadata builder; the integration tests look for it in logs.
BACKEND_LOG_MARKER = "flashmla_backend vLLM plugin: MLA decode attention runs on flashmla_backend kernels"


def kv_cache_dtype_problem(kv_cache_dtype: str | None) -> str | None:
    """Why ``kv_cache_dtype`` cannot be used, or ``None`` when it can (``None`` means unset)."""
    if kv_cache_dtype is None or kv_cache_dtype in SUPPORTED_KV_CACHE_DTYPES:
        return None
    kind = "an fp8" if kv_cache_dtype.startswith("fp8") else "a quantized"
    return (f"flashmla_backend does not support {kind} KV cache (kv_cache_dtype={kv_cache_dtype!r}); "
            f"it reads bf16 or fp16 caches only. Use --kv-cache-dtype auto (or one of "
            f"{', '.join(SUPPORTED_KV_CACHE_DTYPES)}), or pick another attention backend")


def compute_capability_problem(major: int, minor: int) -> str | None:
    """Why a GPU of compute capability ``major.minor`` cannot run the kernels, or ``None``."""
    if (major, minor) == SUPPORTED_COMPUTE_CAPABILITY:
        return None
    return (f"flashmla_backend kernels need a Hopper GPU (sm_90: H100/H200/H800/H20), "
            f"found sm_{major}{minor}")
