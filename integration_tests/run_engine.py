"""Runs one offline vLLM engine for the integration tests (a subprocess of ``vllm_harness``).

    python integration_tests/run_engine.py SPEC.json OUT.json

SPEC holds ``model``, ``llm_kwargs``, ``prompts`` (token-id lists), ``max_tokens`` and
``logprobs``. Generation is greedy with ``ignore_eos``. OUT gets, per prompt, the generated
``token_ids`` and per position ``{token_id: logprob}`` of the top tokens.
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
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    print(f"[run_engine] generated in {time.perf_counter() - started:.1f} s", flush=True)

    token_ids, logprobs = [], []
    for output in outputs:
        completion = output.outputs[0]
        token_ids.append(list(completion.token_ids))
        logprobs.append([{str(tok): lp.logprob for tok, lp in position.items()}
                         for position in (completion.logprobs or [])])
    with open(out_path, "w") as f:
        json.dump({"token_ids": token_ids, "logprobs": logprobs}, f)
    print("[run_engine] done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
