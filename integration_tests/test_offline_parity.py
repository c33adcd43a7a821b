"""Offline ``LLM.generate``: the CUSTOM backend against vLLM's FLASHMLA on the tiny model.

Same prompts, greedy, 32 tokens each; eager and with CUDA graphs, cache blocks of 64 and 128
tokens, and a run with chunked prefill so that batches mix prefill chunks and decodes. Also:
an fp8 KV cache stops the engine at configuration time with the plugin's reason.

Tolerance (``vllm_harness.assert_greedy_close``): the generated tokens must be identical up to
the end, or up to a near tie (the two candidates within 0.1 in logprob) where the two bf16
implementations may round differently; chosen-token logprobs agree within 0.05 up to there,
and at least half of the prompts must match over all 32 tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from vllm_harness import (
    MAX_TOKENS,
    PROMPT_LENGTHS,
    EngineSpec,
    assert_custom_backend_used,
    assert_greedy_close,
    llm_kwargs,
    make_prompts,
    requires_engine,
    run_engine,
)

from flashmla_backend.vllm_plugin.capabilities import kv_cache_dtype_problem

pytestmark = requires_engine


def run_pair(model: Path, env: dict[str, str], work_dir: Path, vocab_size: int, mode: str,
             block_size: int, **extra: Any) -> None:
    prompts = make_prompts(PROMPT_LENGTHS, vocab_size, seed=block_size)
    flashmla = run_engine(EngineSpec(str(model), llm_kwargs("FLASHMLA", mode, block_size, **extra), prompts,
                                     MAX_TOKENS), work_dir, "flashmla", env)
    custom = run_engine(EngineSpec(str(model), llm_kwargs("CUSTOM", mode, block_size, **extra), prompts,
                                   MAX_TOKENS), work_dir, "custom", env)
    assert "Using AttentionBackendEnum.FLASHMLA backend" in flashmla.log
    assert_custom_backend_used(custom.log)
    assert all(len(ids) == MAX_TOKENS for ids in custom.token_ids)
    assert_greedy_close(flashmla, custom)


@pytest.mark.parametrize(("mode", "block_size"), [("eager", 64), ("cudagraph", 64), ("eager", 128),
                                                  ("cudagraph", 128)])
def test_custom_matches_flashmla(tiny_model: Path, vllm_env: dict[str, str], tmp_path: Path, vocab_size: int,
                                 mode: str, block_size: int) -> None:
    run_pair(tiny_model, vllm_env, tmp_path, vocab_size, mode, block_size)


def test_custom_matches_flashmla_with_mixed_prefill_and_decode(tiny_model: Path, vllm_env: dict[str, str],
                                                              tmp_path: Path, vocab_size: int) -> None:
    """256-token steps: the long prompts are prefilled in chunks while the short ones decode,
    so most steps hold prefill and decode requests together."""
    run_pair(tiny_model, vllm_env, tmp_path, vocab_size, "cudagraph", 64,
             enable_chunked_prefill=True, max_num_batched_tokens=256)


def test_fp8_kv_cache_is_refused_when_the_engine_is_configured(tiny_model: Path, vllm_env: dict[str, str],
                                                                tmp_path: Path) -> None:
    """vLLM validates the selected backend before building the model: the engine must stop
    with our reason instead of running an fp8 cache through a bf16 kernel."""
    spec = EngineSpec(str(tiny_model), llm_kwargs("CUSTOM", "eager", 64, kv_cache_dtype="fp8"), [[6, 7, 8]], 1)
    failed = run_engine(spec, tmp_path, "fp8", vllm_env, timeout_s=300, expect_failure=True)
    assert kv_cache_dtype_problem("fp8") in failed.log
