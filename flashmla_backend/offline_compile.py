"""Compile the kernels for sm_90a without a GPU, through the ``cuda.bindings.nvrtc`` wheel.

CI has no GPU: this proves every kernel still compiles for Hopper and lets tests read the
SASS (``nvdisasm``) for the instructions the design relies on (HGMMA, UTMALDG, SYNCS).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from .kernel_sources import KernelModule, assembled_source


class OfflineCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message holds NVRTC's log."""


def _check(result: tuple, what: str) -> tuple:
    from cuda.bindings import nvrtc

    err, *rest = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise OfflineCompileError(f"{what} failed: {err}")
    return tuple(rest)


def compile_to_cubin(module: KernelModule, options: tuple[str, ...] | None = None) -> tuple[bytes, str]:
    """Compiles ``module`` (for sm_90a, unless ``options`` replaces its NVRTC options) and
    returns ``(cubin, nvrtc_log)``."""
    return compile_source(assembled_source(module.source_file), module.source_file, options or module.options)


def compile_source(source: str, name: str, options: tuple[str, ...]) -> tuple[bytes, str]:
    """Compiles CUDA ``source`` (``name`` for NVRTC's messages) with ``options`` (plus CuPy's
    ``-ftz=true`` and ``-lineinfo``) and returns ``(cubin, nvrtc_log)``; raises
    :class:`OfflineCompileError` with NVRTC's log when it fails."""
    from cuda.bindings import nvrtc

    (prog,) = _check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
    opts = [o.encode() for o in options] + [b"-ftz=true", b"-lineinfo"]
    try:
        (compile_err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        (log_size,) = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = b" " * log_size
        _check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        log_text = log.decode(errors="replace").rstrip("\x00 \n")
        if compile_err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise OfflineCompileError(f"{name} {options}:\n{log_text}")
        (size,) = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin, log_text
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def find_nvdisasm() -> str | None:
    """Path of ``nvdisasm`` (the ``nvidia-cuda-nvdisasm`` wheel, else PATH), or None."""
    try:
        import nvidia  # namespace package of the NVIDIA wheels

        for base in nvidia.__path__:
            for cand in Path(base).glob("cu*/bin/nvdisasm"):
                return str(cand)
    except ImportError:
        pass
    return shutil.which("nvdisasm")


def disassemble(cubin: bytes) -> str:
    """SASS text of ``cubin`` via nvdisasm."""
    tool = find_nvdisasm()
    if tool is None:
        raise FileNotFoundError("nvdisasm not found: pip install nvidia-cuda-nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-c", f.name], check=True, capture_output=True, text=True).stdout
