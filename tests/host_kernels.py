"""Build the kernels for the host, on the emulation in ``host_simt.hpp`` (and ``host_ptx.hpp``
for the decode's Hopper PTX).

The kernel text is the shipped source with its local headers inlined as for NVRTC, except
``ptx_helpers.cuh`` (inline PTX), whose helpers the emulation provides; ``definition`` and
``constant`` take single definitions out of a header for tests of one device function. A test
appends a ``main`` that reads its inputs from stdin, launches with ``simt::launch`` and writes
the outputs to stdout. Builds are cached per process by their text.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
EMULATION = Path(__file__).resolve().parent / "host_simt.hpp"
COMPILER = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
requires_host_compiler = pytest.mark.skipif(COMPILER is None,
                                            reason="no host C++ compiler (g++, c++ or clang++) on PATH")



@lru_cache(maxsize=None)
def compiler_has_float16() -> bool:
    """Whether the host compiler has ``_Float16`` (GCC 12+ and Clang on x86-64 and AArch64):
    the fp16 builds of the emulation need it."""
    if COMPILER is None:
        return False
    probe = _BUILD_DIR / "float16_probe.cpp"
    probe.write_text("int main() { _Float16 h = static_cast<_Float16>(1.5f); return int(float(h)) - 1; }\n")
    result = subprocess.run([COMPILER, "-std=c++17", str(probe), "-o", str(_BUILD_DIR / "float16_probe")],
                            capture_output=True)
    return result.returncode == 0


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")
_BUILD_DIR = Path(tempfile.mkdtemp(prefix="flashmla_host_kernels_"))


def definition(source: str, opening: str, where: str = "the kernel headers") -> str:
    """The text of the top-level definition in ``source`` that starts with ``opening`` (a
    regex), through its closing brace (and the ``;`` after a struct)."""
    match = re.search(opening, source, re.MULTILINE)
    assert match is not None, f"{opening!r} not found in {where}: update this test"
    depth, i = 0, source.index("{", match.start())
    while True:
        depth += {"{": 1, "}": -1}.get(source[i], 0)
        i += 1
        if depth == 0:
            break
    return source[match.start():i] + (";" if source[i:i + 1] == ";" else "")


def constant(source: str, name: str) -> str:
    """The ``constexpr int name = ...;`` line of ``source``."""
    match = re.search(rf"^constexpr int {name} = [^;]+;", source, re.MULTILINE)
    assert match is not None, f"constant {name} not found in the kernel headers: update this test"
    return match.group(0)


def host_kernel_source(source_file: str) -> str:
    """``kernels/source_file`` with its local includes inlined (``ptx_helpers.cuh`` left out) and
    its dynamic shared array taken from the emulation."""
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen or name == "ptx_helpers.cuh":
            return ""
        seen.add(name)
        text = (KERNELS / name).read_text().replace("#pragma once", "")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    text = expand(source_file)
    return _DYNAMIC_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = simt::dynamic_smem<{m.group(1)}>();", text)


@lru_cache(maxsize=None)
def build(program: str, defines: tuple[str, ...] = (), header: Path = EMULATION) -> Path:
    """Compiles ``program`` (C++ after ``header``: the emulation, or ``host_ptx.hpp`` for kernels
    with Hopper PTX) and returns the executable."""
    text = f'#include "{header}"\n{program}'
    name = hashlib.sha1((text + " ".join(defines)).encode()).hexdigest()[:16]
    source, binary = _BUILD_DIR / f"{name}.cpp", _BUILD_DIR / name
    source.write_text(text)
    result = subprocess.run([COMPILER, "-std=c++17", "-O1", "-Wall", "-Wno-unused-function",
                             "-Wno-unused-variable", *defines, str(source), "-o", str(binary)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"host build failed ({source}):\n{result.stderr[-4000:]}"
    return binary


def run(binary: Path, args: list[object], stdin: bytes) -> bytes:
    """Runs ``binary`` with ``args`` on ``stdin``; returns its stdout (a non-zero exit fails)."""
    result = subprocess.run([str(binary), *map(str, args)], input=stdin, capture_output=True, timeout=300)
    if result.returncode == -11:  # SIGSEGV: simt::Guarded's guard pages, or a wild address
        raise AssertionError(f"{binary.name}: a kernel read or wrote outside its buffers (SIGSEGV)")
    assert result.returncode == 0, f"{binary.name} exited with {result.returncode}: {result.stderr[-2000:]!r}"
    return result.stdout
