#!/usr/bin/env python3
"""Queries a server started by ``examples/serve_deepseek.sh`` through the OpenAI API.

    python examples/openai_client.py                      # http://localhost:8000/v1
    python examples/openai_client.py --base-url http://host:8000/v1 --concurrency 32

Runs a completion, a streamed chat completion, then ``--concurrency`` requests at once and
reports their throughput. Needs ``pip install openai``.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--model", default=None, help="served model name (default: the first one listed)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="EMPTY", timeout=300)
    model = args.model or client.models.list().data[0].id
    print(f"model: {model}")

    completion = client.completions.create(model=model, prompt="The capital of France is",
                                           max_tokens=args.max_tokens, temperature=0.0)
    print(f"--- completion\n{completion.choices[0].text}\n")

    print("--- streamed chat")
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Explain paged attention briefly."}],
        max_tokens=args.max_tokens, temperature=0.0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print("\n")

    def one_request(i: int) -> int:
        response = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Count from {i} to {i + 20}."}],
            max_tokens=args.max_tokens, temperature=0.0)
        return response.usage.completion_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        tokens = sum(pool.map(one_request, range(args.concurrency)))
    elapsed = time.perf_counter() - started
    print(f"--- {args.concurrency} concurrent chats: {tokens} tokens in {elapsed:.1f} s "
          f"({tokens / elapsed:.0f} tok/s)")


if __name__ == "__main__":
    main()
