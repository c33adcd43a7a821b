"""Speculative decoding with the tiny model's DeepSeek MTP layer, on the CUSTOM backend.

With 2 speculative tokens every decode step verifies 3 query tokens per request, so the
decode kernel runs with ``s_q = 3`` (causal) under full CUDA graphs, and the MTP drafter's own
MLA layer runs on the backend too. Greedy output must equal greedy output without speculation
(same tolerance as ``test_offline_parity``: identical up to a near tie).
"""

from __future__ import annotations

from pathlib import Path

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

pytestmark = requires_engine

NUM_SPECULATIVE_TOKENS = 2


def test_mtp_greedy_output_equals_greedy_output_without_speculation(
        tiny_model: Path, vllm_env: dict[str, str], tmp_path: Path, vocab_size: int) -> None:
    prompts = make_prompts(PROMPT_LENGTHS, vocab_size, seed=11)
    plain = run_engine(EngineSpec(str(tiny_model), llm_kwargs("CUSTOM", "cudagraph", 64), prompts, MAX_TOKENS),
                       tmp_path, "plain", vllm_env)
    speculative_kwargs = llm_kwargs(
        "CUSTOM", "cudagraph", 64,
        speculative_config={"method": "mtp", "num_speculative_tokens": NUM_SPECULATIVE_TOKENS})
    speculative = run_engine(EngineSpec(str(tiny_model), speculative_kwargs, prompts, MAX_TOKENS),
                             tmp_path, "mtp", vllm_env)
    assert_custom_backend_used(speculative.log)
    assert all(len(ids) == MAX_TOKENS for ids in speculative.token_ids)
    assert_greedy_close(plain, speculative)
