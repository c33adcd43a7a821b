"""Prefix caching and preemption: CUSTOM against FLASHMLA when the KV cache is reused and too small.

Twelve prompts of 300 to 2200 tokens, eight of them sharing a 1024-token prefix, generate 64
tokens each, twice in one engine (the second round hits the prefix cache). The KV cache is cut
to :data:`NUM_GPU_BLOCKS` blocks of 64 tokens (a small ``gpu_memory_utilization`` would do the
same, but by an amount that depends on the card), far less than the batch needs. vLLM 0.26
admits a request only when its whole prompt fits (``scheduler_reserve_full_isl``), which left
enough room for decoding and no preemption in a first run on an H200; with that gate off and
256-token prefill chunks, requests are admitted chunk by chunk, the cache runs out while they
grow, and the scheduler preempts running requests and recomputes them later. Both backends must show
preemptions and prefix-cache hits in vLLM's counters, and give the same greedy tokens (the
tolerance of ``test_offline_parity``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from vllm_harness import EngineSpec, assert_custom_backend_used, assert_greedy_close, llm_kwargs, requires_engine, run_engine

pytestmark = requires_engine

#: 48 blocks x 64 tokens = 3072 tokens of cache, for ~16k tokens of demand.
NUM_GPU_BLOCKS = 48
MAX_MODEL_LEN = 2560
SHARED_PREFIX_TOKENS = 1024
SUFFIX_LENGTHS = [5, 64, 100, 300, 600, 900, 1100, 1150]
UNSHARED_LENGTHS = [300, 800, 1500, 2200]
MAX_TOKENS = 64


def make_prompts(vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(6, vocab_size, (SHARED_PREFIX_TOKENS,), generator=generator).tolist()
    shared = [prefix + torch.randint(6, vocab_size, (n,), generator=generator).tolist() for n in SUFFIX_LENGTHS]
    unshared = [torch.randint(6, vocab_size, (n,), generator=generator).tolist() for n in UNSHARED_LENGTHS]
    return [p for pair in zip(shared[:4], unshared, strict=True) for p in pair] + shared[4:]


def test_prefix_caching_and_preemption_match_flashmla(tiny_model: Path, vllm_env: dict[str, str],
                                                      tmp_path: Path, vocab_size: int) -> None:
    prompts = make_prompts(vocab_size, seed=21)
    outputs = {}
    for backend in ("FLASHMLA", "CUSTOM"):
        kwargs = llm_kwargs(backend, "cudagraph", 64, enable_prefix_caching=True, num_gpu_blocks_override=NUM_GPU_BLOCKS,
                            max_model_len=MAX_MODEL_LEN, max_num_seqs=12, disable_log_stats=False,
                            enable_chunked_prefill=True, max_num_batched_tokens=256,
                            scheduler_reserve_full_isl=False)
        outputs[backend] = run_engine(EngineSpec(str(tiny_model), kwargs, prompts, MAX_TOKENS, rounds=2),
                                      tmp_path, backend.lower(), vllm_env)
    assert_custom_backend_used(outputs["CUSTOM"].log)
    for backend, output in outputs.items():
        preemptions = output.counters.get("vllm:num_preemptions", 0)
        hits = output.counters.get("vllm:prefix_cache_hits", 0)
        print(f"{backend}: {preemptions:.0f} preemptions, {hits:.0f} prefix-cache hit tokens, "
              f"cached tokens per prompt in round 2: {output.num_cached_tokens}")
        assert preemptions > 0, f"{backend}: no preemption happened; counters {output.counters}"
        assert hits > 0 and sum(output.num_cached_tokens) > 0, f"{backend}: no prefix-cache hit"
        assert all(len(ids) == MAX_TOKENS for ids in output.token_ids)
    assert_greedy_close(outputs["FLASHMLA"], outputs["CUSTOM"])
