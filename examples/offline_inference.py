#!/usr/bin/env python3
"""Offline generation with vLLM 0.26, MLA decode on flashmla_backend's kernels (backend CUSTOM).

    python examples/offline_inference.py                                   # DeepSeek-V2-Lite-Chat
    python examples/offline_inference.py --model deepseek-ai/DeepSeek-V3 --tensor-parallel-size 8
    python examples/offline_inference.py --tiny                            # local tiny model, no download

Needs a Hopper GPU and ``pip install 'flashmla_backend[vllm]'``: the package's
``vllm.general_plugins`` entry point registers the backend in every vLLM process, and
``attention_config={"backend": "CUSTOM"}`` selects it.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "Explain multi-head latent attention in one sentence:",
    "def fibonacci(n):",
]


def build_tiny_model() -> str:
    """Builds the tiny random DeepSeek-V3 of ``make_tiny_deepseek.py`` in a temporary folder."""
    path = Path(__file__).with_name("make_tiny_deepseek.py")
    spec = importlib.util.spec_from_file_location("make_tiny_deepseek", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.make_tiny_deepseek(Path(tempfile.mkdtemp(prefix="tiny-deepseek-"))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deepseek-ai/DeepSeek-V2-Lite-Chat")
    parser.add_argument("--tiny", action="store_true", help="use a tiny local random model instead of --model")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    model = build_tiny_model() if args.tiny else args.model
    llm = LLM(
        model=model,
        attention_config={"backend": "CUSTOM"},
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        gpu_memory_utilization=0.3 if args.tiny else 0.9,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for output in llm.generate(PROMPTS, params):
        print(f"--- {output.prompt!r}\n{output.outputs[0].text}\n")

    # Chat models also take messages; the tokenizer's chat template formats them.
    chat = llm.chat([{"role": "user", "content": "Write a haiku about GPUs."}], params)
    print(f"--- chat\n{chat[0].outputs[0].text}")


if __name__ == "__main__":
    main()
