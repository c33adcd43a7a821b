"""Kernel launches through the driver, with the arguments packed into one host buffer.

CuPy's launch turns every argument into an object of its own and enters the device context
around each call; with 24 arguments to the decode, an eager decode call spent over 120 µs of
host time (benchmarks/NOTES.md, "Host time"). Here each kernel's parameter list is a struct
format declared once (``KernelSignature``): a launch packs the values with ``struct.pack_into``
into a per-thread buffer whose parameter pointers were built once, and calls ``cuLaunchKernel``
(``cuLaunchKernelEx`` for a programmatic dependent launch) on torch's current stream. The first
launch of a kernel checks the signature against the kernel's own parameter sizes
(``cuFuncGetParamInfo``), so a mismatch raises instead of passing garbage; the tests also check
that no kernel takes more parameters than its signature. CUDA-graph capture
records these launches like any other.
"""

from __future__ import annotations

import ctypes
import struct
import threading
from functools import lru_cache

import torch

#: ``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`` (cuda.h).
_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttribute(ctypes.Structure):
    """``CUlaunchAttribute``: an id, padding to 8 bytes, a 64-byte value union."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint8 * 64)]


class _LaunchConfig(ctypes.Structure):
    """``CUlaunchConfig``."""

    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


class LaunchError(RuntimeError):
    """The driver refused a launch, or a signature does not match its kernel."""


class KernelSignature:
    """A kernel's parameter list as ``struct`` codes, one per parameter: ``Q`` a pointer,
    ``q`` an int64, ``i`` an int32, ``f`` a float32, ``128s`` a 128-byte ``CUtensorMap``."""

    def __init__(self, name: str, codes: str) -> None:
        self.name = name
        self.codes = tuple(codes.split())
        self.format = "<" + "".join(self.codes)
        self.sizes = tuple(struct.calcsize("<" + code) for code in self.codes)
        offsets, offset = [], 0
        for size in self.sizes:
            offsets.append(offset)
            offset += size
        self.offsets = tuple(offsets)
        self._per_thread = threading.local()

    def __repr__(self) -> str:
        return f"KernelSignature({self.name!r}, {' '.join(self.codes)!r})"

    def pack(self, args: tuple) -> ctypes.Array:
        """``args`` packed into this thread's buffer; returns the ``void*`` array the driver
        reads the parameters through (valid until this thread's next pack)."""
        slot = getattr(self._per_thread, "slot", None)
        if slot is None:
            buffer = ctypes.create_string_buffer(max(1, struct.calcsize(self.format)))
            base = ctypes.addressof(buffer)
            params = (ctypes.c_void_p * len(self.codes))(*[base + o for o in self.offsets])
            slot = self._per_thread.slot = (buffer, params)
        if len(args) != len(self.codes):
            raise LaunchError(f"{self.name}: {len(args)} arguments for {len(self.codes)} parameters")
        try:
            struct.pack_into(self.format, slot[0], 0, *args)
        except struct.error as exc:
            raise LaunchError(f"{self.name}: arguments {args!r} do not fit {' '.join(self.codes)}: {exc}") from exc
        return slot[1]


@lru_cache(maxsize=1)
def _driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernel.restype = ctypes.c_int
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cuLaunchKernelEx.restype = ctypes.c_int
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_void_p]
    lib.cuFuncGetParamInfo.restype = ctypes.c_int
    lib.cuFuncGetParamInfo.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
                                       ctypes.POINTER(ctypes.c_size_t)]
    lib.cuCtxGetCurrent.restype = ctypes.c_int
    lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.cuCtxPushCurrent.restype = ctypes.c_int
    lib.cuCtxPushCurrent.argtypes = [ctypes.c_void_p]
    lib.cuCtxPopCurrent.restype = ctypes.c_int
    lib.cuCtxPopCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.cuDeviceGet.restype = ctypes.c_int
    lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    lib.cuDevicePrimaryCtxRetain.restype = ctypes.c_int
    lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    lib.cuGetErrorName.restype = ctypes.c_int
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.cuOccupancyMaxActiveBlocksPerMultiprocessor.restype = ctypes.c_int
    lib.cuOccupancyMaxActiveBlocksPerMultiprocessor.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p,
                                                                ctypes.c_int, ctypes.c_size_t]
    return lib


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(result, ctypes.byref(name))
        raise LaunchError(f"{what} failed: {(name.value or b'?').decode()} ({result})")


_primary_contexts: dict[int, int] = {}
_checked: set[tuple[int, str]] = set()
_lock = threading.Lock()


def _primary_context(device_index: int) -> int:
    ctx = _primary_contexts.get(device_index)
    if ctx is None:
        lib, device, handle = _driver(), ctypes.c_int(), ctypes.c_void_p()
        _check(lib.cuDeviceGet(ctypes.byref(device), device_index), "cuDeviceGet")
        _check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(handle), device), "cuDevicePrimaryCtxRetain")
        ctx = _primary_contexts[device_index] = handle.value
    return ctx


def _make_primary_current(device_index: int) -> bool:
    """Makes ``device_index``'s primary context current on this thread unless it already is;
    returns whether it was pushed (then ``_restore_context`` pops it)."""
    lib, current, primary = _driver(), ctypes.c_void_p(), _primary_context(device_index)
    _check(lib.cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
    if current.value == primary:
        return False
    _check(lib.cuCtxPushCurrent(primary), "cuCtxPushCurrent")  # another device's context, or none
    return True


def _restore_context(pushed: bool) -> None:
    if pushed:
        _check(_driver().cuCtxPopCurrent(ctypes.byref(ctypes.c_void_p())), "cuCtxPopCurrent")


def check_signature(function: int, signature: KernelSignature) -> None:
    """Raises ``LaunchError`` unless every parameter of ``signature`` exists in the kernel
    ``function`` (a ``CUfunction``) with the same size (checked once per pair). A kernel with
    parameters beyond the signature is not caught here (asking past the last parameter is a
    driver error that sanitizers report); ``count_parameters`` does that for the tests."""
    key = (function, signature.format)
    if key in _checked:
        return
    lib, offset, size = _driver(), ctypes.c_size_t(), ctypes.c_size_t()
    for index, expected in enumerate(signature.sizes):
        if lib.cuFuncGetParamInfo(function, index, ctypes.byref(offset), ctypes.byref(size)) != 0:
            raise LaunchError(f"{signature.name}: the kernel has {index} parameters, the signature {len(signature.sizes)}")
        if size.value != expected:
            raise LaunchError(f"{signature.name}: parameter {index} is {size.value} bytes in the kernel, "
                              f"{expected} in the signature ({signature.codes[index]})")
    with _lock:
        _checked.add(key)


def count_parameters(function: int) -> int:
    """How many parameters the kernel ``function`` takes, by asking for each until the driver
    refuses (that last refusal shows as an API error under compute-sanitizer: tests only)."""
    lib, offset, size, count = _driver(), ctypes.c_size_t(), ctypes.c_size_t(), 0
    while lib.cuFuncGetParamInfo(function, count, ctypes.byref(offset), ctypes.byref(size)) == 0:
        count += 1
    return count


def resident_ctas_per_sm(function: int, block: int, device_index: int, shared_mem: int = 0) -> int:
    """How many CTAs of ``block`` threads of the kernel ``function`` an SM holds at once (its
    registers, shared memory and threads), by the driver's occupancy calculator."""
    count = ctypes.c_int()
    pushed = _make_primary_current(device_index)
    try:
        _check(_driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(count), function, block,
                                                                        shared_mem),
               "cuOccupancyMaxActiveBlocksPerMultiprocessor")
    finally:
        _restore_context(pushed)
    return count.value


@lru_cache(maxsize=None)
def launch_attributes(programmatic: bool) -> ctypes.Array:
    """The ``CUlaunchAttribute`` array of a launch, built once per kind (the driver copies it at
    each launch): empty for a plain launch, else programmatic stream serialization."""
    attributes = (_LaunchAttribute * int(programmatic))()
    for attribute in attributes:
        attribute.id = _PROGRAMMATIC_STREAM_SERIALIZATION
        attribute.value[0] = 1  # programmaticStreamSerializationAllowed
    return attributes


def launch_kernel(function: int, signature: KernelSignature, grid: tuple[int, int, int], block: int,
                  args: tuple, device_index: int, shared_mem: int = 0, programmatic: bool = False) -> None:
    """Launches the kernel ``function`` (a ``CUfunction`` loaded on ``device_index``, from
    ``runtime.get_kernel``) with ``args`` packed by ``signature`` on torch's current stream of
    that device. ``programmatic``: with programmatic stream serialization, so it may start while
    the stream's previous kernel runs (the kernel then waits for that one's results itself)."""
    params = signature.pack(args)
    stream = torch._C._cuda_getCurrentRawStream(device_index)
    lib = _driver()
    pushed = _make_primary_current(device_index)
    try:
        check_signature(function, signature)
        attributes = launch_attributes(programmatic)
        if attributes:
            config = _LaunchConfig(grid[0], grid[1], grid[2], block, 1, 1, shared_mem, stream, attributes,
                                   len(attributes))
            _check(lib.cuLaunchKernelEx(ctypes.byref(config), function, params, None),
                   f"{signature.name}: cuLaunchKernelEx")
        else:
            _check(lib.cuLaunchKernel(function, grid[0], grid[1], grid[2], block, 1, 1, shared_mem, stream,
                                      params, None), f"{signature.name}: cuLaunchKernel")
    finally:
        _restore_context(pushed)
