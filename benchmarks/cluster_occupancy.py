"""How many clusters of the decode kernel fit on this GPU at once (cuOccupancyMaxActiveClusters),
for cluster sizes 1, 2 and 4 along the query-block axis: a one-wave grid of pairs needs
2 x that count >= the SMs the scheduler sizes its parts for (NOTES.md "v27").

    FLASHMLA_BACKEND_DECODE_FILE=... python benchmarks/cluster_occupancy.py
"""

from __future__ import annotations

import ctypes
import struct

import torch

from flashmla_backend import kernel_sources, launch, runtime
from flashmla_backend._constants import DECODE_SMEM_BYTES, DECODE_THREADS


def max_active_clusters(function: int, cluster_x: int, grid_z: int) -> int:
    lib = launch._driver()
    attributes = (launch._LaunchAttribute * 1)()
    attributes[0].id = launch._CLUSTER_DIMENSION
    struct.pack_into("<III", attributes[0].value, 0, cluster_x, 1, 1)
    config = launch._LaunchConfig(cluster_x, 1, grid_z, DECODE_THREADS, 1, 1, DECODE_SMEM_BYTES, None,
                                  ctypes.cast(attributes, ctypes.POINTER(launch._LaunchAttribute)), 1)
    count = ctypes.c_int()
    rc = lib.cuOccupancyMaxActiveClusters(ctypes.byref(count), ctypes.c_void_p(function), ctypes.byref(config))
    return count.value if rc == 0 else -rc


def main() -> None:
    index = torch.cuda.current_device()
    function = runtime.get_kernel(kernel_sources.decode_module(torch.bfloat16), "mla_decode", index)
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    print(f"{torch.cuda.get_device_name(index)}: {sms} SMs")
    for cluster_x in (1, 2, 4):
        n = max_active_clusters(function, cluster_x, 132)
        print(f"cluster of {cluster_x}: {n} clusters at once ({n * cluster_x} CTAs)")


if __name__ == "__main__":
    main()
