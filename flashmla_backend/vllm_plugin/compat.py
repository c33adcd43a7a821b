"""Which vLLM releases the plugin is written against, and the check that enforces it.

The backend subclasses vLLM internals whose signatures change between minor releases, so the
plugin refuses other releases up front with a message naming both versions, instead of failing
later at some attribute deep inside vLLM.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

#: vLLM release series (major, minor) the backend was written and checked against.
SUPPORTED_VLLM_SERIES: tuple[tuple[int, int], ...] = ((0, 26),)

#: Set to 1 to load the plugin on an unsupported vLLM anyway (at your own risk).
ALLOW_ANY_VLLM_ENV = "FLASHMLA_BACKEND_ALLOW_ANY_VLLM"

_RELEASE = re.compile(r"^\s*v?(\d+)\.(\d+)")


def supported_versions_text() -> str:
    """Human-readable list of the supported series, e.g. ``"0.26.x"``."""
    return ", ".join(f"{major}.{minor}.x" for major, minor in SUPPORTED_VLLM_SERIES)


def parse_release_series(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string such as ``"0.26.0"``, ``"0.26.1rc1"`` or
    ``"0.26.0.dev12+g1234abc"``; ``None`` when it does not start with two numbers."""
    match = _RELEASE.match(version)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def vllm_version_problem(found: str) -> str | None:
    """Why vLLM ``found`` is not supported, or ``None`` when it is."""
    series = parse_release_series(found)
    if series is not None and series in SUPPORTED_VLLM_SERIES:
        return None
    return (f"flashmla_backend's vLLM plugin supports vLLM {supported_versions_text()}, but vLLM "
            f"{found} is installed. Install a supported release (pip install "
            f"'flashmla_backend[vllm]'), uninstall flashmla_backend to run vLLM without the plugin, "
            f"or set {ALLOW_ANY_VLLM_ENV}=1 to load it anyway")


def check_vllm_version(found: str, allow_any: bool = False) -> None:
    """Raises ``RuntimeError`` naming ``found`` and the supported versions unless ``found`` is
    supported or ``allow_any`` is set."""
    problem = vllm_version_problem(found)
    if problem is not None and not allow_any:
        raise RuntimeError(problem)


def allow_any_vllm_from_env() -> bool:
    """Whether ``FLASHMLA_BACKEND_ALLOW_ANY_VLLM`` asks to skip the version check."""
    return os.environ.get(ALLOW_ANY_VLLM_ENV, "0").strip().lower() in ("1", "true", "yes")


def installed_vllm_version() -> str | None:
    """The installed vLLM version from its package metadata (vLLM is not imported), or
    ``None`` when vLLM is not installed."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def found_vllm_version() -> str:
    """The vLLM version this process would use.

    Reads the package metadata; only without metadata (a source tree on ``PYTHONPATH``) is
    vLLM imported for its ``__version__``. Raises ``ModuleNotFoundError`` naming the supported
    versions when vLLM cannot be found at all.
    """
    version = installed_vllm_version()
    if version is not None:
        return version
    try:
        import vllm
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"flashmla_backend's vLLM plugin needs vLLM {supported_versions_text()}, which is not "
            f"installed: pip install 'flashmla_backend[vllm]'", name="vllm") from exc
    return str(getattr(vllm, "__version__", "unknown"))
