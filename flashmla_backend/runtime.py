"""Compiles the kernels through CuPy (NVRTC), caches them, and launches them on torch's stream.

CuPy keeps compiled cubins on disk (``CUPY_CACHE_DIR``, default
``~/.cache/flashmla_backend/cupy`` unless already set), so a process pays NVRTC once per
kernel variant per machine. ``precompile()`` loads every variant up front, which CUDA-graph
capture needs: nothing may compile or allocate through CuPy inside a capture.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._constants import DECODE_SMEM_BYTES, MAX_BATCH
from .kernel_sources import KernelModule, all_modules, assembled_source
from .settings import settings

os.environ.setdefault("CUPY_CACHE_DIR", str(Path.home() / ".cache" / "flashmla_backend" / "cupy"))

_lock = threading.Lock()
_functions: dict[tuple[int, str, tuple[str, ...], str], Any] = {}
_checked_devices: set[int] = set()
_sm_counts: dict[int, int] = {}

#: Dynamic shared memory each entry point needs above the 48 KB default.
_DYNAMIC_SMEM = {"mla_decode": DECODE_SMEM_BYTES, "mla_schedule": 4 * (MAX_BATCH + 1)}


class UnsupportedDeviceError(RuntimeError):
    """The GPU is not a Hopper (sm_90) part."""


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "flashmla_backend needs CuPy for CUDA 13 to run on the GPU: pip install cupy-cuda13x") from exc
    return cupy


def check_device(device: torch.device) -> int:
    """Raises ``UnsupportedDeviceError`` unless ``device`` is a Hopper GPU; returns its index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _checked_devices:
        major, minor = torch.cuda.get_device_capability(index)
        if (major, minor) != (9, 0):
            name = torch.cuda.get_device_name(index)
            raise UnsupportedDeviceError(
                f"flashmla_backend kernels need a Hopper GPU (sm_90: H100/H200/H800/H20); "
                f"{name} is sm_{major}{minor}. Use mla_decode_reference for other devices.")
        _checked_devices.add(index)
    return index


def sm_count(device_index: int) -> int:
    """Multiprocessors of a GPU (cached: the scheduler and the validation ask on every call)."""
    count = _sm_counts.get(device_index)
    if count is None:
        count = _sm_counts[device_index] = torch.cuda.get_device_properties(device_index).multi_processor_count
    return count


def get_function(module: KernelModule, name: str, device_index: int) -> Any:
    """The loaded ``cupy.RawKernel`` for entry point ``name`` of ``module`` on ``device_index``."""
    key = (device_index, module.source_file, module.options, name)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    cp = _cupy()
    with _lock, cp.cuda.Device(device_index):
        fn = _functions.get(key)
        if fn is None:
            raw = cp.RawModule(code=assembled_source(module.source_file), options=module.options)
            fn = raw.get_function(name)
            smem = _DYNAMIC_SMEM.get(name)
            if smem is not None:
                fn.max_dynamic_shared_size_bytes = smem
            fn.compile()
            _functions[key] = fn
    return fn


class _TorchStream:
    """Duck-typed CuPy stream: CuPy only reads ``.ptr``."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


def launch(fn: Any, grid: tuple[int, int, int], block: int, args: tuple, device_index: int,
           shared_mem: int = 0) -> None:
    """Launches ``fn`` on torch's current stream of ``device_index``."""
    stream = _TorchStream(torch._C._cuda_getCurrentRawStream(device_index))
    cp = _cupy()
    with cp.cuda.Device(device_index):
        fn(grid, (block, 1, 1), args, shared_mem=shared_mem, stream=stream)


def programmatic_launch_enabled() -> bool:
    """Whether ``FLASHMLA_BACKEND_PDL=1`` asks for programmatic dependent launches of the
    combine (an experiment, off by default: benchmarks/NOTES.md)."""
    return settings().programmatic_launch


def _ctypes_argument(value: Any) -> ctypes._SimpleCData:
    """A kernel argument as the ctypes value whose bytes the driver copies: Python ints are
    device pointers; numpy scalars keep their width."""
    if isinstance(value, np.int32):
        return ctypes.c_int32(int(value))
    if isinstance(value, np.int64):
        return ctypes.c_int64(int(value))
    if isinstance(value, np.float32):
        return ctypes.c_float(float(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return ctypes.c_uint64(value)
    raise TypeError(f"programmatic launch: unsupported kernel argument {value!r} ({type(value).__name__})")


def launch_programmatic(fn: Any, grid: tuple[int, int, int], block: int, args: tuple, device_index: int,
                        shared_mem: int = 0) -> None:
    """Launches ``fn`` on torch's current stream with programmatic stream serialization: it may
    start while the previous kernel on the stream is still running, and must itself wait
    (``grid_dependency_wait``) before reading that kernel's results. Capturable in CUDA graphs."""
    from cuda.bindings import driver

    values = [_ctypes_argument(v) for v in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    attribute = driver.CUlaunchAttribute()
    attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attribute.value.programmaticStreamSerializationAllowed = 1
    config = driver.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = grid
    config.blockDimX, config.blockDimY, config.blockDimZ = block, 1, 1
    config.sharedMemBytes = shared_mem
    config.hStream = driver.CUstream(torch._C._cuda_getCurrentRawStream(device_index))
    config.attrs = [attribute]
    config.numAttrs = 1
    cp = _cupy()
    with cp.cuda.Device(device_index):
        function = driver.CUfunction(fn.kernel.ptr)
        (err,) = driver.cuLaunchKernelEx(config, function, ctypes.addressof(pointers), 0)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuLaunchKernelEx failed: {err}")


def precompile(device: torch.device | int | None = None) -> None:
    """Compiles and loads every kernel variant on ``device`` (default: the current GPU).

    Call it before capturing a CUDA graph that runs the kernels.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    elif isinstance(device, int):
        device = torch.device("cuda", device)
    index = check_device(device)
    for module in all_modules():
        for name in module.entry_points:
            get_function(module, name, index)
