"""Python mirror of ``kernels/mla_common.cuh`` and the decode kernel's launch shape.

``tests/test_kernel_compile.py`` checks that these agree with the CUDA sources.
"""

HEAD_DIM_QK = 576  # 512 latent + 64 RoPE
HEAD_DIM_V = 512
PAGE_SIZE = 64
BLOCK_M = 64
SPLIT_OVERHEAD_PAGES = 5  # default scheduler cost of one split, in pages (schedule.py)
NO_SPLIT_SLACK_16THS = 1  # default no-split slack of the scheduler, in 16ths of a part (schedule.py)
METADATA_FIELDS = 8
MD_BEGIN_REQ, MD_BEGIN_PAGE, MD_END_REQ, MD_END_PAGE, MD_BEGIN_SPLIT = range(5)

MAX_HEADS_PER_KV_HEAD = 128  # h_q / h_k: the query rows folded into one M block set

DECODE_THREADS = 384
SCHEDULE_THREADS = 1024
#: The one-warp scheduler (``mla_schedule_small``): threads, and the largest batch it takes.
SMALL_SCHEDULE_THREADS = 256
SMALL_SCHEDULE_MAX_BATCH = 32
#: Largest batch the one-CTA scheduler holds in shared memory (int32 per request).
MAX_BATCH = 48 * 1024
COMBINE_WARPS = 8
#: Most requests one combine CTA serves (its shared-memory table of split ranges).
COMBINE_MAX_REQUESTS_PER_CTA = 32

_TILE_BYTES = PAGE_SIZE * HEAD_DIM_QK * 2
#: Q block + two KV stages + P + up to four per-row float arrays + up to eight mbarriers +
#: alignment slack. The decode sources static_assert their own map against it
#: (``-DMLA_LAUNCH_SMEM_BYTES``), archived versions included.
DECODE_SMEM_BYTES = 3 * _TILE_BYTES + PAGE_SIZE * 64 * 2 + 4 * BLOCK_M * 4 + 8 * 8 + 1024

#: SMs assumed when a schedule is built on the CPU (an H100/H200 SXM has 132).
DEFAULT_NUM_SMS = 132
