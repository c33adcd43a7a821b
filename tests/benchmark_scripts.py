"""Loads a script of ``benchmarks/`` as a module, for the tests of its CPU side (the scripts are
run by path on the device machine, not installed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark_script(stem: str) -> ModuleType:
    """``benchmarks/<stem>.py`` imported as the module ``stem`` (registered in ``sys.modules``,
    which dataclasses need)."""
    spec = importlib.util.spec_from_file_location(stem, BENCHMARKS / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[stem] = module
    spec.loader.exec_module(module)
    return module
