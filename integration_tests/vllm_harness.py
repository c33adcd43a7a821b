"""Shared helpers of the vLLM integration tests.

- Skip reasons: vLLM 0.26 importable, a Hopper GPU with CuPy, the model-building packages.
- :func:`plugin_environment`: the environment a vLLM subprocess needs to load the plugin from
  this checkout (an entry-point shim when the package is not pip-installed).
- :func:`run_engine`: one ``vllm.LLM`` in its own subprocess (``run_engine.py``), so engines
  never share a process, GPU memory or global state, and a crash is contained.
- :func:`compare_greedy`: greedy outputs of two runs, token by token, with logprob tolerances.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from flashmla_backend.vllm_plugin import compat
from flashmla_backend.vllm_plugin.capabilities import BACKEND_LOG_MARKER, compute_capability_problem

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINE_SCRIPT = Path(__file__).resolve().with_name("run_engine.py")
ENTRY_POINT_GROUP = "vllm.general_plugins"
ENTRY_POINT_VALUE = "flashmla_backend.vllm_plugin:register"

#: Log line vLLM prints when CUSTOM was selected (``CudaPlatform.get_attn_backend_cls``).
VLLM_SELECTED_CUSTOM_LOG = "Using AttentionBackendEnum.CUSTOM backend"
#: Printed by our metadata builder in each worker process.
PLUGIN_LOG_MARKER = BACKEND_LOG_MARKER

#: Seconds one engine subprocess may take, start-up (compile, graph capture) included.
ENGINE_TIMEOUT_S = 900

#: 10 prompts of 8..3000 tokens, around page (64) and block (128) boundaries.
PROMPT_LENGTHS = [8, 63, 64, 65, 200, 511, 1024, 1500, 2049, 3000]
#: Tokens generated per prompt.
MAX_TOKENS = 32

#: Small engines, so that each fits beside whatever else holds the GPU.
BASE_LLM_KWARGS: dict[str, Any] = {
    "gpu_memory_utilization": 0.3,
    "max_model_len": 4096,
    "max_num_seqs": 16,
    "seed": 0,
    "dtype": "bfloat16",
}


def llm_kwargs(backend: str, mode: str, block_size: int, **extra: Any) -> dict[str, Any]:
    """``LLM`` keyword arguments for attention ``backend`` in ``mode`` ("eager" or "cudagraph")."""
    kwargs = dict(BASE_LLM_KWARGS, attention_config={"backend": backend}, block_size=block_size,
                  enforce_eager=mode == "eager")
    kwargs.update(extra)
    return kwargs


# ---------------------------------------------------------------------------------------------
# Skip reasons


def _vllm_skip_reason() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return (f"vLLM is not importable ({type(exc).__name__}: {exc}); the integration tests need "
                f"vLLM {compat.supported_versions_text()} (GPU machine: . /tmp/vsite/env.sh)")
    problem = compat.vllm_version_problem(compat.found_vllm_version())
    return problem


def _hopper_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (the vLLM integration tests run on an H100/H200)"
    major, minor = torch.cuda.get_device_capability()
    problem = compute_capability_problem(major, minor)
    if problem is not None:
        return problem
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install cupy-cuda13x); the kernels launch through it"
    return None


def _model_builder_skip_reason() -> str | None:
    missing = [name for name in ("transformers", "tokenizers", "safetensors")
               if importlib.util.find_spec(name) is None]
    if missing:
        return f"building the tiny test model needs {', '.join(missing)}"
    return None


def _first(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r is not None), None)


VLLM_SKIP_REASON = _vllm_skip_reason()
GPU_SKIP_REASON = _first(VLLM_SKIP_REASON, _hopper_skip_reason())
ENGINE_SKIP_REASON = _first(GPU_SKIP_REASON, _model_builder_skip_reason())

#: vLLM importable (no GPU needed).
requires_vllm = pytest.mark.skipif(VLLM_SKIP_REASON is not None, reason=VLLM_SKIP_REASON or "")
#: vLLM and a Hopper GPU.
requires_vllm_on_hopper = pytest.mark.skipif(GPU_SKIP_REASON is not None, reason=GPU_SKIP_REASON or "")
#: vLLM, a Hopper GPU and what the tiny model is built with: full engine runs.
requires_engine = pytest.mark.skipif(ENGINE_SKIP_REASON is not None, reason=ENGINE_SKIP_REASON or "")


def requires_gpus(count: int) -> pytest.MarkDecorator:
    """Skips unless at least ``count`` GPUs are visible."""
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(found < count, reason=f"needs {count} GPUs, found {found}")


# ---------------------------------------------------------------------------------------------
# Environment of vLLM subprocesses


def entry_point_installed() -> bool:
    """Whether some installed distribution declares the plugin's entry point."""
    return any(ep.value == ENTRY_POINT_VALUE
               for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def write_entry_point_shim(folder: Path) -> Path:
    """Writes a minimal ``.dist-info`` declaring the entry point into ``folder``: with ``folder``
    on ``PYTHONPATH``, ``importlib.metadata`` (and so vLLM) finds the plugin without a pip install."""
    dist_info = folder / "flashmla_backend_vllm_plugin_shim-0.0.0.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: flashmla-backend-vllm-plugin-shim\nVersion: 0.0.0\n")
    (dist_info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nflashmla_backend = {ENTRY_POINT_VALUE}\n")
    return folder


def plugin_environment(work_dir: Path) -> dict[str, str]:
    """Environment for vLLM subprocesses: this checkout importable, the entry point
    discoverable, offline, INFO logs (the tests read vLLM's backend selection from them)."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT)]
    if not entry_point_installed():
        paths.insert(0, str(write_entry_point_shim(work_dir / "plugin_shim")))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1"})
    # flashinfer is not in the GPU machine's bundle; vLLM's sampler would import it.
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    return env


# ---------------------------------------------------------------------------------------------
# Engine runs


@dataclass
class EngineSpec:
    """One offline ``LLM.generate`` run: greedy, ``ignore_eos``, token-id prompts."""

    model: str
    llm_kwargs: dict[str, Any]
    prompts: list[list[int]]
    max_tokens: int = 32
    logprobs: int = 5
    #: Times the prompts are generated; the last round is reported.
    rounds: int = 1


@dataclass
class GreedyOutput:
    """Per prompt: generated token ids and, per position, ``{token_id: logprob}`` of the top
    tokens (the chosen one included); prefix-cache hits per prompt; vLLM's counters (only with
    ``disable_log_stats=False``)."""

    token_ids: list[list[int]]
    logprobs: list[list[dict[int, float]]]
    log: str = field(repr=False, default="")
    num_cached_tokens: list[int] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)


def run_engine(spec: EngineSpec, work_dir: Path, name: str, env: dict[str, str],
               timeout_s: int = ENGINE_TIMEOUT_S, expect_failure: bool = False) -> GreedyOutput:
    """Runs ``spec`` in a fresh Python process; its log goes to ``work_dir/<name>.log``.

    Raises ``AssertionError`` with the end of the log when the run fails or times out; with
    ``expect_failure``, when it succeeds instead (a failed run then returns just its log).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = (work_dir / f"{name}.spec.json", work_dir / f"{name}.out.json",
                                     work_dir / f"{name}.log")
    spec_path.write_text(json.dumps(spec.__dict__))
    out_path.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, str(ENGINE_SCRIPT), str(spec_path), str(out_path)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                  timeout=timeout_s, start_new_session=True)
            returncode: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = f"timeout after {timeout_s} s"
    text = log_path.read_text(errors="replace")
    if expect_failure:
        assert returncode != 0, f"engine run {name!r} was expected to fail but succeeded; log {log_path}"
        return GreedyOutput([], [], text)
    if returncode != 0 or not out_path.exists():
        raise AssertionError(f"engine run {name!r} failed ({returncode}); log {log_path}, last lines:\n"
                             + "\n".join(text.splitlines()[-60:]))
    result = json.loads(out_path.read_text())
    logprobs = [[{int(t): lp for t, lp in pos.items()} for pos in seq] for seq in result["logprobs"]]
    return GreedyOutput(result["token_ids"], logprobs, text, result.get("num_cached_tokens", []),
                        result.get("counters", {}))


def assert_custom_backend_used(log: str) -> None:
    """vLLM selected CUSTOM, and our builder ran (its marker line is in the log)."""
    assert VLLM_SELECTED_CUSTOM_LOG in log, f"vLLM did not log {VLLM_SELECTED_CUSTOM_LOG!r}"
    assert PLUGIN_LOG_MARKER in log, f"the plugin's builder did not log {PLUGIN_LOG_MARKER!r}"


def make_prompts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random token-id prompts of the given lengths (ids 6.. skip the special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(6, vocab_size, (n,), generator=generator).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------
# Comparing greedy outputs


@dataclass
class Comparison:
    """How two greedy runs agree: per prompt, the first position where the tokens differ
    (``None`` when all agree), and the largest logprob gap over the positions compared."""

    first_mismatch: list[int | None]
    max_logprob_diff: float
    problems: list[str]

    @property
    def identical_prompts(self) -> int:
        return sum(m is None for m in self.first_mismatch)


def compare_greedy(reference: GreedyOutput, test: GreedyOutput, logprob_atol: float,
                   tie_atol: float) -> Comparison:
    """Compares two greedy runs of the same prompts.

    Up to the first differing token of a prompt, the chosen tokens' logprobs must agree within
    ``logprob_atol``. Where the tokens first differ, the difference must be a near tie: each
    run's token is in the other's top logprobs, and the reference rates the two within
    ``tie_atol``. Two correct bf16 implementations add up rounding in different orders, so a
    near tie can flip; after it the sequences are no longer comparable and checking stops there.
    """
    problems: list[str] = []
    first_mismatch: list[int | None] = []
    max_diff = 0.0
    for p, (ref_ids, test_ids) in enumerate(zip(reference.token_ids, test.token_ids, strict=True)):
        if len(ref_ids) != len(test_ids):
            problems.append(f"prompt {p}: {len(ref_ids)} vs {len(test_ids)} generated tokens")
        mismatch = None
        for i, (r, t) in enumerate(zip(ref_ids, test_ids, strict=False)):  # lengths checked above
            ref_lp, test_lp = reference.logprobs[p][i], test.logprobs[p][i]
            if r == t:
                diff = abs(ref_lp[r] - test_lp[t])
                max_diff = max(max_diff, diff)
                if diff > logprob_atol:
                    problems.append(f"prompt {p} token {i} ({r}): logprob {ref_lp[r]:.4f} vs {test_lp[t]:.4f}")
                continue
            mismatch = i
            if t not in ref_lp or r not in test_lp:
                problems.append(f"prompt {p} token {i}: {r} vs {t}, not in each other's top logprobs")
            elif abs(ref_lp[r] - ref_lp[t]) > tie_atol:
                problems.append(f"prompt {p} token {i}: {r} vs {t} is no near tie "
                                f"(reference logprobs {ref_lp[r]:.4f} vs {ref_lp[t]:.4f})")
            break
        first_mismatch.append(mismatch)
    return Comparison(first_mismatch, max_diff, problems)


def assert_greedy_close(reference: GreedyOutput, test: GreedyOutput, logprob_atol: float = 0.05,
                        tie_atol: float = 0.1, min_identical_fraction: float = 0.5) -> Comparison:
    """:func:`compare_greedy`, failing on any problem or when fewer than
    ``min_identical_fraction`` of the prompts are identical over all generated tokens."""
    comparison = compare_greedy(reference, test, logprob_atol, tie_atol)
    identical = comparison.identical_prompts
    total = len(comparison.first_mismatch)
    summary = (f"{identical}/{total} prompts identical; first mismatches {comparison.first_mismatch}; "
               f"max logprob diff {comparison.max_logprob_diff:.4f}")
    assert not comparison.problems, summary + "\n" + "\n".join(comparison.problems)
    assert identical >= min_identical_fraction * total, summary
    print(summary)
    return comparison
