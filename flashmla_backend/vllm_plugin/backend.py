"""flashmla_backend's paged MLA decode as a vLLM 0.26 attention backend (``CUSTOM``).

Only the decode half of MLA lives here. vLLM's MLA layer splits each batch: prefill tokens go
through ``forward_mha`` (inherited, run by vLLM's MLA prefill backend), and decode tokens
through ``forward_mqa``, which this backend implements with ``flash_mla_with_kvcache``.

Per step, the metadata builder runs ``get_mla_metadata`` once on the GPU; every layer of the
step reuses that schedule. For full CUDA graphs the schedule is copied into buffers allocated
once, so the captured kernels read it from fixed addresses on every replay.

Import this module only inside a vLLM process: it imports vLLM.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from . import compat

compat.check_vllm_version(compat.found_vllm_version(), allow_any=compat.allow_any_vllm_from_env())

from vllm.config import VllmConfig  # noqa: E402  (after the version check on purpose)
from vllm.config.cache import CacheDType  # noqa: E402
from vllm.logger import init_logger  # noqa: E402
from vllm.model_executor.layers.attention.mla_attention import (  # noqa: E402
    MLACommonBackend,
    MLACommonDecodeMetadata,
    MLACommonImpl,
    MLACommonMetadata,
    MLACommonMetadataBuilder,
    QueryLenSupport,
)
from vllm.platforms.interface import DeviceCapability  # noqa: E402
from vllm.v1.attention.backend import (  # noqa: E402
    AttentionCGSupport,
    AttentionLayer,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec  # noqa: E402

from .. import flash_mla_with_kvcache, get_mla_metadata, precompile, reserve_workspace  # noqa: E402
from .._constants import DEFAULT_NUM_SMS, METADATA_FIELDS  # noqa: E402
from ..settings import settings  # noqa: E402
from ..validation import query_layout_problem  # noqa: E402
from . import allocator_trace  # noqa: E402
from .block_table import expand_block_table, kernel_pages_per_block, split_cache_blocks  # noqa: E402
from .capabilities import (  # noqa: E402
    BACKEND_LOG_MARKER,
    BACKEND_NAME,
    HEAD_SIZE,
    KERNEL_BLOCK_SIZES,
    KV_LORA_RANK,
    SUPPORTED_KV_CACHE_DTYPES,
    SUPPORTED_MODEL_DTYPES,
    compute_capability_problem,
    kv_cache_dtype_problem,
)

logger = init_logger("vllm.flashmla_backend")



class FlashMLACompatBackend(MLACommonBackend):
    """MLA backend whose decode runs on flashmla_backend's Hopper kernels.

    Declares bf16/fp16 models and KV caches, head size 576, 64-token kernel blocks (vLLM
    splits larger cache blocks), and sm_90 GPUs. An fp8 KV cache is rejected when vLLM
    validates the configuration, with the reason from ``supports_combination``.
    """

    supported_dtypes: ClassVar[list[torch.dtype]] = list(SUPPORTED_MODEL_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list[CacheDType]] = list(SUPPORTED_KV_CACHE_DTYPES)  # type: ignore[arg-type]

    @staticmethod
    def get_name() -> str:
        # The enum member name, so AttentionBackendEnum[get_name()] resolves back to CUSTOM.
        return BACKEND_NAME

    @staticmethod
    def get_builder_cls() -> type[FlashMLACompatMetadataBuilder]:
        return FlashMLACompatMetadataBuilder

    @staticmethod
    def get_impl_cls() -> type[FlashMLACompatImpl]:
        return FlashMLACompatImpl

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return list(KERNEL_BLOCK_SIZES)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [HEAD_SIZE]

    @classmethod
    def supports_compute_capability(cls, capability: DeviceCapability) -> bool:
        return compute_capability_problem(capability.major, capability.minor) is None

    @classmethod
    def supports_combination(
        cls,
        head_size: int,
        dtype: torch.dtype,
        kv_cache_dtype: CacheDType | None,
        block_size: int | None,
        use_mla: bool,
        has_sink: bool,
        use_sparse: bool,
        use_mm_prefix: bool,
        device_capability: DeviceCapability,
    ) -> str | None:
        """The reason vLLM prints when this configuration cannot use the backend, or ``None``."""
        problem = kv_cache_dtype_problem(kv_cache_dtype)
        if problem is not None:
            return problem
        if use_sparse:
            return "flashmla_backend runs dense MLA only; sparse MLA (DeepSeek-V3.2) is not supported"
        if importlib.util.find_spec("cupy") is None:
            return "flashmla_backend needs CuPy to launch its kernels: pip install cupy-cuda13x"
        return None


@dataclass
class FlashMLACompatDecodeMetadata(MLACommonDecodeMetadata):
    """Decode metadata of one step, shared by every layer.

    Besides vLLM's ``block_table`` ([num_decodes, max_pages] int32, 64-token kernel page ids)
    and ``seq_lens`` ([num_decodes] int32), it carries the split-KV schedule.
    """

    #: int32 ``[num_sm_parts, 8]`` from ``get_mla_metadata``.
    tile_scheduler_metadata: torch.Tensor
    #: int32 ``[num_decodes + 1]`` prefix sum of splits per request.
    num_splits: torch.Tensor
    #: Query tokens per request (1, or 1 + speculative tokens); uniform across the batch.
    query_len: int


@dataclass
class FlashMLACompatMetadata(MLACommonMetadata[FlashMLACompatDecodeMetadata]):
    """vLLM's MLA metadata with this backend's decode part."""


class FlashMLACompatMetadataBuilder(MLACommonMetadataBuilder[FlashMLACompatMetadata]):
    """Builds the per-step decode metadata, running ``get_mla_metadata`` once per step.

    Full CUDA graphs are supported for uniform batches (every decode request has the same
    query length, as with MTP / speculative decoding). Whatever a captured kernel reads lives
    at a fixed address: vLLM's block table and sequence lengths are persistent buffers, the
    schedule is copied into buffers allocated here, and the split workspace of the API is
    reserved here and kept alive for as long as the graphs may replay.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH
    # UNIFORM makes vLLM raise the decode threshold to 1 + num_speculative_tokens.
    query_len_support: ClassVar[QueryLenSupport] = QueryLenSupport.UNIFORM

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, FlashMLACompatMetadata)
        self._init_decode_state(
            block_size=kv_cache_spec.block_size,
            max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
            max_capture_tokens=self.compilation_config.max_cudagraph_capture_size or 0,
            full_cudagraphs=self.compilation_config.cudagraph_mode.has_full_cudagraphs(),
        )
        logger.info_once("%s (cache blocks of %d tokens = %d kernel page(s); full CUDA graphs %s)",
                         BACKEND_LOG_MARKER, kv_cache_spec.block_size, self.pages_per_block,
                         "on" if self.full_cudagraphs else "off")

    def _init_decode_state(self, block_size: int, max_num_seqs: int, max_capture_tokens: int,
                           full_cudagraphs: bool) -> None:
        """Compiles the kernels and allocates the buffers the decode path keeps across steps.

        Needs ``device``, ``num_heads``, ``dcp_world_size`` and ``reorder_batch_threshold``
        (set by vLLM's base class).
        """
        if self.device.type == "cuda":
            if self.device.index is None:  # the API keys its per-GPU state by index
                self.device = torch.device("cuda", torch.cuda.current_device())
            # Compile (or load from disk) every kernel now: nothing may compile inside a capture.
            precompile(self.device)
            self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        else:  # CPU tensors run the API's float32 reference (tests)
            self.num_sms = DEFAULT_NUM_SMS

        self.pages_per_block = kernel_pages_per_block(block_size)
        self.full_cudagraphs = full_cudagraphs
        # Rows of the persistent buffers: any decode batch vLLM may capture or run.
        self.buffer_rows = max(max_num_seqs, max_capture_tokens)

        self.tile_scheduler_metadata_buffer: torch.Tensor | None = None
        self.num_splits_buffer: torch.Tensor | None = None
        if full_cudagraphs:
            # get_mla_metadata returns [num_sm_parts <= num_sms, 8] and [batch + 1].
            self.tile_scheduler_metadata_buffer = torch.zeros(
                (self.num_sms, METADATA_FIELDS), dtype=torch.int32, device=self.device)
            self.num_splits_buffer = torch.zeros(
                (self.buffer_rows + 1,), dtype=torch.int32, device=self.device)
        self.page_table_buffer: torch.Tensor | None = None

        if full_cudagraphs and self.device.type == "cuda":
            # Size the split workspace for the largest graph now; the API never frees a
            # workspace, so graphs captured with a smaller one stay valid too.
            for query_len in {1, max(1, int(self.reorder_batch_threshold or 1))}:
                batch = min(max_num_seqs, max_capture_tokens // query_len)
                if batch > 0:
                    reserve_workspace(self.device, batch, query_len * self.num_query_heads, 1)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> FlashMLACompatMetadata:
        """vLLM's MLA metadata for one step; also notes the step's batch in the allocator
        trace when one runs (``FLASHMLA_BACKEND_ALLOCATOR_TRACE``)."""
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        trace = allocator_trace.current()
        if trace is not None:
            on_gpu = self.device.type == "cuda"
            trace.note_step(reserved_mib=torch.cuda.memory_reserved(self.device) / 2**20 if on_gpu else None,
                            num_reqs=metadata.num_reqs, num_tokens=metadata.num_actual_tokens,
                            num_decodes=metadata.num_decodes, num_prefills=metadata.num_prefills,
                            max_query_len=metadata.max_query_len, max_seq_len=metadata.max_seq_len)
        return metadata

    @property
    def num_query_heads(self) -> int:
        """Query heads the decode kernel sees: this rank's heads, times the DCP group size
        (decode context parallelism all-gathers the heads before ``forward_mqa``)."""
        return self.num_heads * self.dcp_world_size

    def _build_decode(
        self,
        block_table_tensor: torch.Tensor,
        seq_lens_device: torch.Tensor,
        max_seq_len: int,
        query_start_loc_cpu: torch.Tensor,
        query_start_loc_device: torch.Tensor,
        num_decode_tokens: int,
        dcp_tot_seq_lens_device: torch.Tensor | None,
    ) -> FlashMLACompatDecodeMetadata:
        """Schedules the decode requests of this step.

        Args:
            block_table_tensor: ``[num_decodes, max_blocks]`` int32 cache block ids (vLLM's
                persistent buffer; 64-token kernel pages when the spec's block size is 64).
            seq_lens_device: ``[num_decodes]`` int32 keys per request, new tokens included.
            query_start_loc_cpu: ``[num_decodes + 1]`` int32 on the host; gives the query length.
        """
        query_lens = query_start_loc_cpu[1:] - query_start_loc_cpu[:-1]
        # Uniform by construction (QueryLenSupport.UNIFORM); padded requests may have 0.
        query_len = int(query_lens.max().item())
        tile_scheduler_metadata, num_splits = get_mla_metadata(
            seq_lens_device, query_len * self.num_query_heads, 1)

        if self.full_cudagraphs:
            tile_scheduler_metadata = self._into_buffer(tile_scheduler_metadata, self.tile_scheduler_metadata_buffer)
            num_splits = self._into_buffer(num_splits, self.num_splits_buffer)

        page_table = block_table_tensor
        if self.pages_per_block > 1:
            page_table = self._expand_block_table(block_table_tensor)

        return FlashMLACompatDecodeMetadata(
            block_table=page_table,
            seq_lens=seq_lens_device,
            dcp_tot_seq_lens=dcp_tot_seq_lens_device,
            tile_scheduler_metadata=tile_scheduler_metadata,
            num_splits=num_splits,
            query_len=query_len,
        )

    @staticmethod
    def _into_buffer(values: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
        """``values`` copied into the front of ``buffer`` (same address every step); ``values``
        itself when it does not fit, which only a batch too large for any graph can cause."""
        if buffer is None or values.shape[0] > buffer.shape[0]:
            return values
        front = buffer[: values.shape[0]]
        front.copy_(values)
        return front

    def _expand_block_table(self, block_table: torch.Tensor) -> torch.Tensor:
        """Kernel page ids for a block table of ``pages_per_block * 64``-token blocks, written
        into a persistent buffer."""
        rows, cols = block_table.shape[0], block_table.shape[1] * self.pages_per_block
        buffer = self.page_table_buffer
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != cols:
            buffer = torch.empty((max(rows, self.buffer_rows), cols), dtype=torch.int32, device=self.device)
            self.page_table_buffer = buffer
        return expand_block_table(block_table, self.pages_per_block, out=buffer[:rows])


class FlashMLACompatImpl(MLACommonImpl[FlashMLACompatMetadata]):
    """MLA attention whose decode (``forward_mqa``) calls ``flash_mla_with_kvcache``."""

    can_return_lse_for_decode: bool = True

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None,
        attn_type: str,
        kv_sharing_target_layer_name: str | None,
        # MLA arguments (q_lora_rank, kv_lora_rank, qk_nope_head_dim, ...), passed through.
        **mla_args: Any,
    ) -> None:
        problem = kv_cache_dtype_problem(kv_cache_dtype)
        if problem is not None:
            raise ValueError(problem)
        super().__init__(
            num_heads,
            head_size,
            scale,
            num_kv_heads,
            alibi_slopes,
            sliding_window,
            kv_cache_dtype,
            logits_soft_cap,
            attn_type,
            kv_sharing_target_layer_name,
            **mla_args,
        )
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap is not None:
            raise NotImplementedError(
                "flashmla_backend does not support alibi slopes, sliding windows or logit soft-capping")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(
                f"flashmla_backend implements decoder self-attention only, got attention type {attn_type}")
        if head_size != HEAD_SIZE or self.kv_lora_rank != KV_LORA_RANK:
            raise ValueError(
                f"flashmla_backend needs MLA with kv_lora_rank {KV_LORA_RANK} and a {HEAD_SIZE}-wide cache "
                f"row, got kv_lora_rank {self.kv_lora_rank} and head size {head_size}")
        # The kernels take bf16/fp16 queries; never ask vLLM for pre-quantized ones.
        self.supports_quant_query_input = False
        precompile()

    def forward_mqa(
        self,
        q: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        kv_c_and_k_pe_cache: torch.Tensor,
        attn_metadata: FlashMLACompatMetadata,
        layer: AttentionLayer,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode attention over the paged latent cache.

        Args:
            q: ``(q_nope [T, H, 512], q_pe [T, H, 64])`` or one ``[T, H, 576]`` tensor, where
                ``T = num_decodes * query_len`` tokens, request-major.
            kv_c_and_k_pe_cache: ``[num_blocks, 64, 576]``, the model's dtype.
            attn_metadata: this step's metadata; ``decode`` is set.

        Returns:
            ``out [T, H, 512]`` (dtype of q) and, under decode context parallelism (the only
            reader of it in vLLM), ``lse [T, H]`` float32 (natural log; +inf for a request with
            no keys), the layout vLLM's context-parallel merge expects; else None.
        """
        decode = attn_metadata.decode
        assert decode is not None, "forward_mqa needs decode metadata"
        parts = q if isinstance(q, tuple) else (q,)
        num_tokens, num_heads = parts[0].shape[:2]
        num_decodes = attn_metadata.num_decodes
        query_len = num_tokens // num_decodes
        if query_len * num_decodes != num_tokens or query_len != decode.query_len:
            raise ValueError(
                f"flashmla_backend: {num_tokens} decode tokens do not form {num_decodes} requests of "
                f"{decode.query_len} tokens each (uniform query lengths are required)")

        k_cache = split_cache_blocks(kv_c_and_k_pe_cache).unsqueeze(-2)  # [pages, 64, 1, 576]
        out_dtype = parts[0].dtype
        # A cache stored in the other 16-bit type ("float16" beside a bf16 model) takes a converted q.
        query = tuple(part.to(k_cache.dtype).reshape(num_decodes, query_len, num_heads, part.shape[-1])
                      for part in parts)
        # The kernel reads the latent and RoPE halves in place, each with its own strides: no
        # concatenation kernel per layer. Halves its 16-byte loads cannot read in place, and
        # FLASHMLA_BACKEND_SPLIT_QUERY=0 (vLLM's FlashMLA path, for A/B runs), concatenate.
        if len(query) == 2 and (not settings().split_query or any(
                query_layout_problem("q", part) is not None for part in query)):
            query = (torch.cat(query, dim=-1),)

        out, lse = flash_mla_with_kvcache(
            query[0] if len(query) == 1 else query,
            k_cache,
            decode.block_table,
            decode.seq_lens,
            self.kv_lora_rank,
            decode.tile_scheduler_metadata,
            decode.num_splits,
            softmax_scale=self.scale,
            causal=True,  # bottom-right aligned: the last query_len keys are the new tokens
            check_contents=False,  # vLLM built the tables; no host sync on the decode path
        )
        out = out.view(num_tokens, num_heads, out.shape[-1])
        if out.dtype != out_dtype:
            out = out.to(out_dtype)
        if getattr(self, "dcp_world_size", 1) <= 1:
            # vLLM reads the LSE only to merge decode-context-parallel ranks; without them the
            # [T, H] layout below would cost a transposing copy per layer whenever s_q > 1 (MTP).
            return out, None
        # [b, H, s_q] -> [b * s_q, H]: one row per token, like the output.
        lse = lse.transpose(1, 2).reshape(num_tokens, num_heads)
        return out, lse


__all__ = [
    "FlashMLACompatBackend",
    "FlashMLACompatDecodeMetadata",
    "FlashMLACompatImpl",
    "FlashMLACompatMetadata",
    "FlashMLACompatMetadataBuilder",
]
