"""vLLM attention-backend plugin: flashmla_backend's kernels as vLLM's ``CUSTOM`` MLA backend.

vLLM runs every ``vllm.general_plugins`` entry point in each of its processes; this package's
entry point (``flashmla_backend = flashmla_backend.vllm_plugin:register``, declared in
pyproject) registers :class:`~flashmla_backend.vllm_plugin.backend.FlashMLACompatBackend` as
``AttentionBackendEnum.CUSTOM``. Select it with ``--attention-backend CUSTOM`` or
``LLM(..., attention_config={"backend": "CUSTOM"})``.

Importing this package does not import vLLM; ``register`` does, after checking the version.
"""

from __future__ import annotations

import logging

from . import allocator_trace, compat
from .capabilities import BACKEND_CLASS_PATH, BACKEND_NAME

# Under vLLM's "vllm" logger so that the lines reach vLLM's log handler and format.
_logger = logging.getLogger("vllm.flashmla_backend")


def register() -> None:
    """Registers the backend as vLLM's ``CUSTOM`` attention backend.

    Called by vLLM in each process through the ``vllm.general_plugins`` entry point; safe to
    call more than once. Raises ``RuntimeError`` on an unsupported vLLM release (see
    :mod:`~flashmla_backend.vllm_plugin.compat`) and ``ModuleNotFoundError`` without vLLM.
    Starts the process's allocator trace when ``FLASHMLA_BACKEND_ALLOCATOR_TRACE`` is set
    (:mod:`~flashmla_backend.vllm_plugin.allocator_trace`).
    """
    allocator_trace.start_from_env()
    found = compat.found_vllm_version()
    allow_any = compat.allow_any_vllm_from_env()
    compat.check_vllm_version(found, allow_any=allow_any)
    if allow_any and compat.vllm_version_problem(found) is not None:
        _logger.warning("flashmla_backend: loading the vLLM plugin on unsupported vLLM %s (%s=1)",
                        found, compat.ALLOW_ANY_VLLM_ENV)

    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden():
        current = custom.get_path()
        if current == BACKEND_CLASS_PATH:
            return
        _logger.warning("flashmla_backend: attention backend %s was registered as %s; "
                        "replacing it with %s", BACKEND_NAME, current, BACKEND_CLASS_PATH)
    register_backend(custom, BACKEND_CLASS_PATH)
    _logger.debug("flashmla_backend: registered %s as attention backend %s", BACKEND_CLASS_PATH, BACKEND_NAME)


__all__ = ["register", "BACKEND_CLASS_PATH", "BACKEND_NAME"]
