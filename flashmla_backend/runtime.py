"""Compiles the kernels through CuPy (NVRTC) and caches the loaded modules (``launch.py`` launches them).

CuPy keeps compiled cubins on disk (``CUPY_CACHE_DIR``, default
``~/.cache/flashmla_backend/cupy`` unless already set), so a process pays NVRTC once per
kernel variant per machine. ``precompile()`` loads every variant up front, which CUDA-graph
capture needs: nothing may compile or allocate through CuPy inside a capture.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch

from ._constants import DECODE_SMEM_BYTES, MAX_BATCH
from .kernel_sources import KernelModule, all_modules, assembled_source

os.environ.setdefault("CUPY_CACHE_DIR", str(Path.home() / ".cache" / "flashmla_backend" / "cupy"))

_lock = threading.Lock()
_functions: dict[tuple[int, str, tuple[str, ...], str], Any] = {}
_handles: dict[tuple[int, str, tuple[str, ...], str], int] = {}
_raw_modules: dict[tuple[int, str, tuple[str, ...], str], Any] = {}  # the cupy.RawModule of each function
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
            _handles[key] = fn.kernel.ptr  # read on its own device: CuPy resolves .kernel per device
            _raw_modules[key] = raw
            _functions[key] = fn
    return fn


def module_global(module: KernelModule, name: str, device_index: int, symbol: str) -> int:
    """Device address of the ``__device__`` variable ``symbol`` in the loaded module of entry
    point ``name`` (a diagnostic's table, e.g. the decode's phase trace)."""
    get_function(module, name, device_index)
    raw = _raw_modules[(device_index, module.source_file, module.options, name)]
    with _cupy().cuda.Device(device_index):
        return int(raw.get_global(symbol).ptr)


def get_kernel(module: KernelModule, name: str, device_index: int) -> int:
    """The ``CUfunction`` handle of entry point ``name`` of ``module``, loaded on
    ``device_index`` (what ``launch.launch_kernel`` takes)."""
    key = (device_index, module.source_file, module.options, name)
    handle = _handles.get(key)
    if handle is None:
        get_function(module, name, device_index)
        handle = _handles[key]
    return handle


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
