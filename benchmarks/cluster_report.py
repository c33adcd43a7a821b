"""Which cluster each anchor row's decode gets under FLASHMLA_BACKEND_KV_CLUSTER (GPU machine).

    FLASHMLA_BACKEND_KV_CLUSTER=4 python benchmarks/cluster_report.py

Prints the card's most active clusters of the decode for 2 and 4 CTAs, then per anchor row the
grid (query blocks, KV heads, parts) and the CTAs per cluster the API launches it with: a row
whose grid does not fit one wave of clusters falls back to a smaller cluster (clusters stay
within a GPC), which is worth knowing before reading an A/B of the knob. Rows with one query
block never cluster (and on an H100 they load by cp.async).
"""

from __future__ import annotations

import sys

import torch

from flashmla_backend._constants import BLOCK_M, DECODE_SMEM_BYTES, DECODE_THREADS
from flashmla_backend.api import _call_kernels, decode_cluster_ctas
from flashmla_backend.bench import ANCHOR_CASES
from flashmla_backend.launch import max_active_clusters
from flashmla_backend.schedule import num_sm_parts
from flashmla_backend.settings import settings


def main() -> int:
    if not torch.cuda.is_available():
        print("cluster_report.py: no CUDA GPU here; it runs on the H100/H200 device machine.")
        return 0
    index = torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    decode = _call_kernels(index, torch.bfloat16).decode
    print(f"{torch.cuda.get_device_name(index)}: {sms} SMs; FLASHMLA_BACKEND_KV_CLUSTER={settings().kv_cluster}")
    for ctas in (2, 4):
        active = max_active_clusters(decode, DECODE_THREADS, DECODE_SMEM_BYTES, ctas, index)
        print(f"most active clusters of {ctas}: {active} ({active * ctas} CTAs)")
    print("| row | grid | CTAs per cluster |\n|---|---|---|")
    for case in ANCHOR_CASES:
        rows = case.s_q * case.h_q
        grid = (-(-rows // BLOCK_M), 1, num_sm_parts(sms, rows, 1))
        print(f"| {case.label} | {grid} | {decode_cluster_ctas(index, torch.bfloat16, grid)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
