"""The vLLM plugin's parts that run without vLLM and without a GPU.

Covers the entry point declaration, ``register`` (against a stand-in of vLLM's registry
module, so the real call sequence runs), the version check, the block-table / cache-page
mapping, and the declared capabilities. The backend classes themselves need vLLM and a Hopper
GPU; ``integration_tests/`` runs them.
"""

from __future__ import annotations

import ast
import enum
import importlib.metadata
import importlib.util
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import flashmla_backend.vllm_plugin as plugin
from flashmla_backend import mla_decode_reference
from flashmla_backend.vllm_plugin import compat
from flashmla_backend.vllm_plugin.block_table import (
    expand_block_table,
    kernel_pages_per_block,
    split_cache_blocks,
)
from flashmla_backend.vllm_plugin.capabilities import (
    BACKEND_CLASS_PATH,
    BACKEND_NAME,
    HEAD_SIZE,
    KERNEL_BLOCK_SIZE,
    KERNEL_BLOCK_SIZES,
    KV_LORA_RANK,
    SUPPORTED_COMPUTE_CAPABILITY,
    SUPPORTED_KV_CACHE_DTYPES,
    SUPPORTED_MODEL_DTYPES,
    compute_capability_problem,
    kv_cache_dtype_problem,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINT_GROUP = "vllm.general_plugins"
ENTRY_POINT_NAME = "flashmla_backend"
ENTRY_POINT_VALUE = "flashmla_backend.vllm_plugin:register"


# ---------------------------------------------------------------------------------------------
# Entry point


def test_pyproject_declares_the_entry_point() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    declared = project["entry-points"][ENTRY_POINT_GROUP]
    assert declared == {ENTRY_POINT_NAME: ENTRY_POINT_VALUE}
    assert project["optional-dependencies"]["vllm"] == ["vllm==0.26.*"]


def test_installed_entry_point_resolves_to_register() -> None:
    try:
        importlib.metadata.distribution("flashmla_backend")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("flashmla_backend is not installed as a distribution (pip install -e .), "
                    "so no entry point metadata exists")
    matches = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
               if ep.name == ENTRY_POINT_NAME]
    assert matches, f"no {ENTRY_POINT_NAME!r} entry point in group {ENTRY_POINT_GROUP}"
    assert {ep.value for ep in matches} == {ENTRY_POINT_VALUE}
    assert matches[0].load() is plugin.register


def test_importing_the_plugin_does_not_import_vllm() -> None:
    code = ("import sys\n"
            "import flashmla_backend.vllm_plugin, flashmla_backend.vllm_plugin.block_table\n"
            "import flashmla_backend.vllm_plugin.capabilities, flashmla_backend.vllm_plugin.compat\n"
            "assert callable(flashmla_backend.vllm_plugin.register)\n"
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# register()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                    reason="vLLM is importable here; test_register_without_vllm_simulated covers this case")
def test_register_without_vllm_says_what_to_install() -> None:
    with pytest.raises(ModuleNotFoundError, match=r"vLLM 0\.26\.x.*not installed"):
        plugin.register()


def test_register_without_vllm_simulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "installed_vllm_version", lambda: None)
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ModuleNotFoundError, match=r"vLLM 0\.26\.x.*pip install"):
        plugin.register()


class _FakeRegistry:
    """Stand-in for ``vllm.v1.attention.backends.registry``: the parts ``register`` uses,
    with the same semantics (an override table keyed by enum member)."""

    def __init__(self) -> None:
        self.overrides: dict[object, str] = {}
        self.calls: list[tuple[object, str | None]] = []
        registry = self

        class AttentionBackendEnum(enum.Enum):
            FLASHMLA = "vllm.v1.attention.backends.mla.flashmla.FlashMLABackend"
            CUSTOM = None

            def is_overridden(self) -> bool:
                return self in registry.overrides

            def get_path(self) -> str:
                path = registry.overrides.get(self, self.value)
                if not path:
                    raise ValueError(f"Backend {self.name} must be registered before use")
                return path

        def register_backend(backend: AttentionBackendEnum, class_path: str | None = None):
            registry.calls.append((backend, class_path))
            registry.overrides[backend] = class_path
            return lambda cls: cls

        self.enum = AttentionBackendEnum
        self.register_backend = register_backend

    def install(self, monkeypatch: pytest.MonkeyPatch, version: str) -> None:
        """Puts the fake modules in ``sys.modules`` and reports vLLM ``version`` as installed."""
        monkeypatch.setattr(compat, "installed_vllm_version", lambda: version)
        names = ["vllm", "vllm.v1", "vllm.v1.attention", "vllm.v1.attention.backends"]
        for name in names:
            module = types.ModuleType(name)
            module.__path__ = []  # a package, so submodules resolve
            monkeypatch.setitem(sys.modules, name, module)
        registry = types.ModuleType("vllm.v1.attention.backends.registry")
        registry.AttentionBackendEnum = self.enum
        registry.register_backend = self.register_backend
        monkeypatch.setitem(sys.modules, registry.__name__, registry)


def test_register_registers_the_custom_backend_once(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeRegistry()
    fake.install(monkeypatch, "0.26.0")
    plugin.register()
    plugin.register()  # vLLM may load general plugins more than once per process
    assert fake.calls == [(fake.enum.CUSTOM, BACKEND_CLASS_PATH)]
    assert fake.enum.CUSTOM.get_path() == BACKEND_CLASS_PATH
    assert not fake.enum.FLASHMLA.is_overridden()


def test_register_replaces_another_custom_backend(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    fake = _FakeRegistry()
    fake.install(monkeypatch, "0.26.1")
    fake.overrides[fake.enum.CUSTOM] = "someone.else.Backend"
    # Attach directly: once real vLLM configured logging, "vllm" loggers do not propagate.
    plugin_logger = logging.getLogger("vllm.flashmla_backend")
    plugin_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="vllm.flashmla_backend"):
            plugin.register()
    finally:
        plugin_logger.removeHandler(caplog.handler)
    assert fake.enum.CUSTOM.get_path() == BACKEND_CLASS_PATH
    assert "someone.else.Backend" in caplog.text


def test_register_refuses_an_unsupported_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeRegistry()
    fake.install(monkeypatch, "0.27.0")
    monkeypatch.delenv(compat.ALLOW_ANY_VLLM_ENV, raising=False)
    with pytest.raises(RuntimeError) as excinfo:
        plugin.register()
    message = str(excinfo.value)
    assert "0.27.0" in message and "0.26.x" in message and compat.ALLOW_ANY_VLLM_ENV in message
    assert fake.calls == []


def test_register_on_an_unsupported_vllm_when_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeRegistry()
    fake.install(monkeypatch, "0.27.0")
    monkeypatch.setenv(compat.ALLOW_ANY_VLLM_ENV, "1")
    plugin.register()
    assert fake.calls == [(fake.enum.CUSTOM, BACKEND_CLASS_PATH)]


# ---------------------------------------------------------------------------------------------
# Version check (pure functions)


@pytest.mark.parametrize("version", ["0.26.0", "0.26.3", "0.26.0rc1", "0.26.1.dev5+gabc1234", "v0.26.2"])
def test_supported_vllm_versions(version: str) -> None:
    assert compat.vllm_version_problem(version) is None
    compat.check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.25.1", "0.27.0", "1.26.0", "0.2.6", "dev", "unknown", ""])
def test_unsupported_vllm_versions(version: str) -> None:
    problem = compat.vllm_version_problem(version)
    assert problem is not None and f"vLLM {version} is installed" in problem and "0.26.x" in problem
    with pytest.raises(RuntimeError, match="0.26.x"):
        compat.check_vllm_version(version)
    compat.check_vllm_version(version, allow_any=True)


@pytest.mark.parametrize(("version", "series"), [
    ("0.26.0", (0, 26)), ("0.26", (0, 26)), ("10.2.3", (10, 2)), ("v1.0.0", (1, 0)),
    ("0.26.0.dev1+g0", (0, 26)), ("dev", None), ("", None), ("0", None)])
def test_parse_release_series(version: str, series: tuple[int, int] | None) -> None:
    assert compat.parse_release_series(version) == series


def test_supported_versions_text() -> None:
    assert compat.SUPPORTED_VLLM_SERIES == ((0, 26),)
    assert compat.supported_versions_text() == "0.26.x"


@pytest.mark.parametrize(("value", "allowed"), [("1", True), ("true", True), ("0", False), ("", False)])
def test_allow_any_vllm_from_env(monkeypatch: pytest.MonkeyPatch, value: str, allowed: bool) -> None:
    monkeypatch.setenv(compat.ALLOW_ANY_VLLM_ENV, value)
    assert compat.allow_any_vllm_from_env() is allowed


# ---------------------------------------------------------------------------------------------
# Block-table mapping


@pytest.mark.parametrize(("block_size", "pages"), [(64, 1), (128, 2), (256, 4), (1024, 16)])
def test_kernel_pages_per_block(block_size: int, pages: int) -> None:
    assert kernel_pages_per_block(block_size) == pages


@pytest.mark.parametrize("block_size", [0, 16, 32, 96, 100, -64])
def test_kernel_pages_per_block_rejects_other_sizes(block_size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        kernel_pages_per_block(block_size)


def _random_block_table(lengths: list[int], block_size: int, num_blocks: int, max_blocks: int,
                        generator: torch.Generator) -> torch.Tensor:
    """Distinct block ids for the used blocks; garbage (-1, huge, random) past each end."""
    table = torch.randint(-(2 ** 20), 2 ** 20, (len(lengths), max_blocks), dtype=torch.int32, generator=generator)
    table[:, -1] = -1
    ids = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    used = 0
    for row, length in enumerate(lengths):
        n = -(-length // block_size)
        table[row, :n] = ids[used:used + n]
        used += n
    return table


@pytest.mark.parametrize("block_size", [64, 128, 256])
def test_expand_block_table_maps_each_used_block_to_its_pages(block_size: int) -> None:
    generator = torch.Generator().manual_seed(block_size)
    k = block_size // 64
    lengths = [1, 64, 65, block_size, block_size + 1, 3 * block_size - 7, 0]
    table = _random_block_table(lengths, block_size, num_blocks=64, max_blocks=5, generator=generator)
    before = table.clone()
    pages = expand_block_table(table, k)
    assert pages.dtype == torch.int32 and pages.shape == (len(lengths), 5 * k)
    assert torch.equal(table, before), "the input table must not be modified"
    for row, length in enumerate(lengths):
        for page in range(-(-length // 64)):  # only the pages the kernel reads
            block, within = divmod(page, k)
            assert int(pages[row, page]) == int(table[row, block]) * k + within
    if k == 1:
        assert pages is table


@pytest.mark.parametrize("block_size", [64, 128, 256])
def test_expand_block_table_into_a_persistent_buffer(block_size: int) -> None:
    k = block_size // 64
    table = torch.tensor([[3, 0, 7], [1, 2, -1]], dtype=torch.int32)
    buffer = torch.full((8, 3 * k), -5, dtype=torch.int32)
    out = expand_block_table(table, k, out=buffer[:2])
    assert out.data_ptr() == buffer.data_ptr()
    assert torch.equal(out, expand_block_table(table, k) if k > 1 else table)
    assert bool((buffer[2:] == -5).all()), "rows past the batch must stay untouched"


def test_expand_block_table_rejects_a_wrong_buffer() -> None:
    table = torch.zeros((2, 3), dtype=torch.int32)
    with pytest.raises(ValueError, match="shape"):
        expand_block_table(table, 2, out=torch.empty((2, 5), dtype=torch.int32))
    with pytest.raises(ValueError, match="pages_per_block"):
        expand_block_table(table, 0)


@pytest.mark.parametrize("block_size", [64, 128, 256])
def test_split_cache_blocks_is_a_view_of_consecutive_pages(block_size: int) -> None:
    k = block_size // 64
    cache = torch.arange(5 * block_size * 3, dtype=torch.float32).view(5, block_size, 3)
    pages = split_cache_blocks(cache)
    assert pages.shape == (5 * k, 64, 3)
    assert pages.untyped_storage().data_ptr() == cache.untyped_storage().data_ptr()
    for block in range(5):
        for j in range(k):
            assert torch.equal(pages[block * k + j], cache[block, j * 64:(j + 1) * 64])
    if k == 1:
        assert pages is cache


def test_split_cache_blocks_refuses_a_non_viewable_layout() -> None:
    padded = torch.zeros(4, 130, 8)[:, :128]  # block stride of 130 tokens
    with pytest.raises(ValueError, match="cannot be viewed"):
        split_cache_blocks(padded)
    with pytest.raises(ValueError, match="multiple of 64"):
        split_cache_blocks(torch.zeros(4, 96, 8))


@pytest.mark.parametrize("block_size", [64, 128, 256])
def test_attention_over_split_blocks_matches_attention_over_gathered_tokens(block_size: int) -> None:
    """End to end on the float32 reference: paging through the mapped table reads exactly the
    tokens of each sequence, in order, and never the garbage past the end."""
    generator = torch.Generator().manual_seed(7 + block_size)
    k = block_size // 64
    lengths = [5, 200, block_size, 2 * block_size + 3]
    num_blocks, max_blocks, s_q, h_q = 24, 4, 2, 8
    cache = torch.randn(num_blocks, block_size, HEAD_SIZE, generator=generator).to(torch.bfloat16)
    table = _random_block_table(lengths, block_size, num_blocks, max_blocks, generator)
    q = torch.randn(len(lengths), s_q, h_q, HEAD_SIZE, generator=generator).to(torch.bfloat16)
    seqlens = torch.tensor(lengths, dtype=torch.int32)

    pages = split_cache_blocks(cache).unsqueeze(-2)
    page_table = expand_block_table(table, k)
    out, lse = mla_decode_reference(q, pages, page_table, seqlens, KV_LORA_RANK, causal=True)

    # The same sequences gathered into one contiguous run of pages each.
    gathered = torch.zeros(len(lengths) * max_blocks * k, 64, 1, HEAD_SIZE, dtype=torch.bfloat16)
    flat_table = torch.zeros(len(lengths), max_blocks * k, dtype=torch.int32)
    for row, length in enumerate(lengths):
        tokens = torch.cat([cache[int(table[row, b])] for b in range(-(-length // block_size))])[:length]
        base = row * max_blocks * k
        padded = torch.zeros(-(-length // 64) * 64, HEAD_SIZE, dtype=torch.bfloat16)
        padded[:length] = tokens
        gathered[base:base + padded.shape[0] // 64] = padded.view(-1, 64, 1, HEAD_SIZE)
        flat_table[row] = torch.arange(base, base + max_blocks * k, dtype=torch.int32)
    ref_out, ref_lse = mla_decode_reference(q, gathered, flat_table, seqlens, KV_LORA_RANK, causal=True)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Declared capabilities


def test_declared_block_sizes_and_shapes() -> None:
    assert KERNEL_BLOCK_SIZE == 64 and KERNEL_BLOCK_SIZES == (64,)
    assert HEAD_SIZE == 576 and KV_LORA_RANK == 512
    assert set(SUPPORTED_MODEL_DTYPES) == {torch.bfloat16, torch.float16}
    assert SUPPORTED_COMPUTE_CAPABILITY == (9, 0)
    assert BACKEND_NAME == "CUSTOM"


def test_kv_cache_dtypes() -> None:
    assert set(SUPPORTED_KV_CACHE_DTYPES) == {"auto", "bfloat16", "float16"}
    for ok in (None, "auto", "bfloat16", "float16"):
        assert kv_cache_dtype_problem(ok) is None
    for quantized in ("fp8", "fp8_e4m3", "fp8_e5m2", "fp8_ds_mla", "nvfp4", "int8_per_token_head"):
        problem = kv_cache_dtype_problem(quantized)
        assert problem is not None and repr(quantized) in problem and "--kv-cache-dtype auto" in problem
    assert "fp8 KV cache" in (kv_cache_dtype_problem("fp8") or "")


def test_compute_capability() -> None:
    assert compute_capability_problem(9, 0) is None
    for major, minor in ((8, 0), (8, 9), (10, 0), (12, 0)):
        problem = compute_capability_problem(major, minor)
        assert problem is not None and f"sm_{major}{minor}" in problem


def test_backend_class_path_names_a_class_of_the_backend_module() -> None:
    module, _, cls = BACKEND_CLASS_PATH.rpartition(".")
    assert module == "flashmla_backend.vllm_plugin.backend"
    source = (REPO_ROOT / "flashmla_backend" / "vllm_plugin" / "backend.py").read_text()
    tree = ast.parse(source)  # also a syntax check of the vLLM-dependent module
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert cls in classes
    assert [ast.unparse(b) for b in classes[cls].bases] == ["MLACommonBackend"]
    builder = classes["FlashMLACompatMetadataBuilder"]
    methods = {node.name for node in builder.body if isinstance(node, ast.FunctionDef)}
    assert {"__init__", "_build_decode"} <= methods
    impl = classes["FlashMLACompatImpl"]
    assert "forward_mqa" in {node.name for node in impl.body if isinstance(node, ast.FunctionDef)}
