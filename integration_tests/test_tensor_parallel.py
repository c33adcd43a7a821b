"""Tensor parallel 2 against 1 on the CUSTOM backend (8 heads per rank instead of 16).

The tiny model's weights are on disk, so both ranks load the same numbers and the outputs are
comparable (dummy weights would be drawn per rank). Greedy output must match within the
tolerance of ``test_offline_parity`` (the all-reduce adds rounding of its own).
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
    requires_gpus,
    run_engine,
)

pytestmark = [requires_engine, requires_gpus(2)]


def test_tp2_greedy_output_equals_tp1(tiny_model: Path, vllm_env: dict[str, str], tmp_path: Path,
                                      vocab_size: int) -> None:
    prompts = make_prompts(PROMPT_LENGTHS, vocab_size, seed=13)
    tp1 = run_engine(EngineSpec(str(tiny_model), llm_kwargs("CUSTOM", "cudagraph", 64), prompts, MAX_TOKENS),
                     tmp_path, "tp1", vllm_env)
    tp2 = run_engine(EngineSpec(str(tiny_model), llm_kwargs("CUSTOM", "cudagraph", 64, tensor_parallel_size=2),
                                prompts, MAX_TOKENS), tmp_path, "tp2", vllm_env)
    assert_custom_backend_used(tp2.log)
    assert_greedy_close(tp1, tp2)
