"""Shared fixtures: GPU tests skip with a visible reason where no Hopper GPU and CuPy exist."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
import torch

#: Counts reported by the property tests (printed in the terminal summary).
PROPERTY_COUNTS: Counter[str] = Counter()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if PROPERTY_COUNTS:
        terminalreporter.write_sep("-", "property tests")
        for name, count in sorted(PROPERTY_COUNTS.items()):
            terminalreporter.write_line(f"{name}: {count}")


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (GPU tests run on the H100/H200 device machine)"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs a Hopper (sm_90) GPU, found {torch.cuda.get_device_name()}"
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install cupy-cuda13x)"
    return None


GPU_SKIP_REASON = _gpu_skip_reason()

requires_hopper = pytest.mark.skipif(GPU_SKIP_REASON is not None, reason=GPU_SKIP_REASON or "")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN anywhere gives inf."""
    out64, ref64 = out.double(), ref.double()
    if not bool(torch.isfinite(out64).all()):
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / max(denom, 1e-30)


def assert_lse_close(lse: torch.Tensor, ref: torch.Tensor) -> None:
    """Same +inf (empty rows) positions, finite values within 1e-3."""
    inf_out, inf_ref = torch.isinf(lse), torch.isinf(ref)
    assert torch.equal(inf_out, inf_ref), "lse: +inf (empty row) positions differ"
    assert not bool(torch.isnan(lse).any()), "lse holds NaN"
    finite = ~inf_ref
    if bool(finite.any()):
        torch.testing.assert_close(lse[finite], ref[finite], atol=2e-3, rtol=1e-3)


@pytest.fixture(autouse=True)
def settings_follow_monkeypatch(monkeypatch: pytest.MonkeyPatch):
    """The package parses its FLASHMLA_BACKEND_* settings once per process; inside tests, every
    ``monkeypatch.setenv`` / ``delenv`` (and the undo after the test) makes the next API call
    read them again, as a fresh process would."""
    from flashmla_backend.settings import reload_settings

    set_env, del_env = monkeypatch.setenv, monkeypatch.delenv

    def setenv(name: str, value: str, prepend: str | None = None) -> None:
        set_env(name, value, prepend)
        reload_settings()

    def delenv(name: str, raising: bool = True) -> None:
        del_env(name, raising)
        reload_settings()

    monkeypatch.setenv, monkeypatch.delenv = setenv, delenv  # type: ignore[method-assign]
    reload_settings()
    yield
    reload_settings()
