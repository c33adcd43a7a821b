"""Runs one offline vLLM engine for the integration tests (a subprocess of ``vllm_harness``).

    python integration_tests/run_engine.py SPEC.json OUT.json

SPEC holds ``model``, ``llm_kwargs``, ``prompts`` (token-id lists), ``max_tokens``,
``logprobs`` and ``rounds``. Generation is greedy with ``ignore_eos``; the prompts are generated
``rounds`` times (a later round can hit the prefix cache) and the last round is reported. OUT
gets, per prompt, the generated ``token_ids``, per position ``{token_id: logprob}`` of the top
tokens, and ``num_cached_tokens`` (prefix-cache hits); and ``counters``, vLLM's Prometheus
counters summed over labels (``vllm:num_preemptions``, ``vllm:prefix_cache_hits``, ...), which
need ``disable_log_stats: false`` in ``llm_kwargs``.
"""

from __future__ import annotations

import json
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(spec_path) as f:
        spec = json.load(f)
    started = time.perf_counter()
    llm = LLM(model=spec["model"], **spec["llm_kwargs"])
    print(f"[run_engine] engine ready in {time.perf_counter() - started:.1f} s", flush=True)

    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=spec["logprobs"],
                            ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    for round_index in range(spec.get("rounds", 1)):
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        print(f"[run_engine] round {round_index}: generated in {time.perf_counter() - started:.1f} s", flush=True)

    token_ids, logprobs = [], []
    for output in outputs:
        completion = output.outputs[0]
        token_ids.append(list(completion.token_ids))
        logprobs.append([{str(tok): lp.logprob for tok, lp in position.items()}
                         for position in (completion.logprobs or [])])
    counters: dict[str, float] = {}
    if not spec["llm_kwargs"].get("disable_log_stats", True):
        for metric in llm.get_metrics():
            if hasattr(metric, "value") and isinstance(metric.value, (int, float)):
                counters[metric.name] = counters.get(metric.name, 0) + metric.value
    with open(out_path, "w") as f:
        json.dump({"token_ids": token_ids, "logprobs": logprobs, "counters": counters,
                   "num_cached_tokens": [output.num_cached_tokens or 0 for output in outputs]}, f)
    print("[run_engine] done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
