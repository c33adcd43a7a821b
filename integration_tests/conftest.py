"""Fixtures of the vLLM integration tests.

Every test here skips, with the reason shown by ``-ra``, unless vLLM 0.26 imports; engine
tests also need a Hopper GPU with CuPy and transformers/tokenizers/safetensors (to build the
tiny model). Each engine runs in its own subprocess (see ``vllm_harness.run_engine``).

Set ``FLASHMLA_TINY_DEEPSEEK_DIR`` to a folder made by ``examples/make_tiny_deepseek.py`` to
reuse it instead of building one per session.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # vllm_harness, whatever the import mode

from vllm_harness import ENGINE_SKIP_REASON, REPO_ROOT, plugin_environment  # noqa: E402

MAKE_TINY_DEEPSEEK = REPO_ROOT / "examples" / "make_tiny_deepseek.py"


def load_tiny_model_builder() -> ModuleType:
    """``examples/make_tiny_deepseek.py`` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_tiny_deepseek", MAKE_TINY_DEEPSEEK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model_builder() -> ModuleType:
    return load_tiny_model_builder()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_model_builder: ModuleType) -> Path:
    """Folder with the tiny DeepSeek-V3 (bf16 random weights, MTP layer) and its tokenizer."""
    if ENGINE_SKIP_REASON is not None:
        pytest.skip(ENGINE_SKIP_REASON)
    prebuilt = os.environ.get("FLASHMLA_TINY_DEEPSEEK_DIR")
    if prebuilt and (Path(prebuilt) / "config.json").exists():
        return Path(prebuilt)
    return tiny_model_builder.make_tiny_deepseek(tmp_path_factory.mktemp("tiny-deepseek"), seed=0)


@pytest.fixture(scope="session")
def vocab_size(tiny_model_builder: ModuleType) -> int:
    return int(tiny_model_builder.TINY_DEEPSEEK_V3_CONFIG["vocab_size"])


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for vLLM subprocesses that load the plugin from this checkout."""
    return plugin_environment(tmp_path_factory.mktemp("vllm-env"))
