"""``vllm serve <tiny model> --attention-backend CUSTOM`` driven by the ``openai`` client.

One server for the module, on a free localhost port, started in its own process group and
always killed at the end. Covers /v1/completions and /v1/chat/completions, streaming and not,
32 concurrent requests, and that the server's log shows vLLM selected our backend.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from vllm_harness import assert_custom_backend_used, requires_engine
from vllm_server import Server, ServerStartError, serve

pytestmark = [
    requires_engine,
    pytest.mark.skipif(importlib.util.find_spec("openai") is None, reason="the openai client is not installed"),
]

MODEL_NAME = "tiny-deepseek"
MAX_TOKENS = 16
REQUEST_TIMEOUT_S = 120
#: Shorter than one 64-token page, so repeated prompts never hit the prefix cache and the
#: streamed and non-streamed greedy answers come from identical computations.
PROMPT = "Bakalo dimu fesa, gorilu"
CHAT = [{"role": "user", "content": "Hello there, friend! Tell me of the mountains."}]


@pytest.fixture(scope="module")
def server(tiny_model: Path, vllm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    args = ["--attention-backend", "CUSTOM", "--gpu-memory-utilization", "0.3", "--max-model-len", "4096",
            "--max-num-seqs", "32", "--seed", "0"]
    try:
        with serve(tiny_model, MODEL_NAME, args, vllm_env, log_path) as running:
            yield running
    except ServerStartError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)


def _completion(client, stream: bool) -> tuple[str, int | None]:
    """Greedy completion of :data:`PROMPT`: the text and the reported completion tokens."""
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0,
                  extra_body={"ignore_eos": True})
    if not stream:
        response = client.completions.create(**kwargs)
        assert len(response.choices) == 1 and response.choices[0].finish_reason == "length"
        return response.choices[0].text, response.usage.completion_tokens
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    usage = next((c.usage for c in chunks if c.usage is not None), None)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    return text, usage.completion_tokens if usage is not None else None


def _chat(client, stream: bool) -> tuple[str, int | None]:
    """Greedy chat answer to :data:`CHAT`: the text and the reported completion tokens."""
    kwargs = dict(model=MODEL_NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0.0,
                  extra_body={"ignore_eos": True})
    if not stream:
        response = client.chat.completions.create(**kwargs)
        message = response.choices[0].message
        assert message.role == "assistant" and response.choices[0].finish_reason == "length"
        return message.content or "", response.usage.completion_tokens
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    usage = next((c.usage for c in chunks if c.usage is not None), None)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, usage.completion_tokens if usage is not None else None


def test_server_runs_the_custom_backend(server: Server, client) -> None:
    models = [m.id for m in client.models.list().data]
    assert MODEL_NAME in models
    assert_custom_backend_used(server.log())


def test_completions(client) -> None:
    text, tokens = _completion(client, stream=False)
    assert tokens == MAX_TOKENS and text


def test_completions_streaming_matches_non_streaming(client) -> None:
    expected, _ = _completion(client, stream=False)
    streamed, tokens = _completion(client, stream=True)
    assert tokens == MAX_TOKENS
    assert streamed == expected


def test_chat_completions(client) -> None:
    text, tokens = _chat(client, stream=False)
    assert tokens == MAX_TOKENS and text


def test_chat_completions_streaming_matches_non_streaming(client) -> None:
    expected, _ = _chat(client, stream=False)
    streamed, tokens = _chat(client, stream=True)
    assert tokens == MAX_TOKENS
    assert streamed == expected


def test_32_concurrent_requests(client) -> None:
    """Completions and chats, streamed and not, all in flight together (decode batches of ~32)."""
    kinds = [(_completion, False), (_completion, True), (_chat, False), (_chat, True)] * 8

    def call(kind: tuple) -> tuple[str, int | None]:
        fn, stream = kind
        return fn(client, stream)

    with ThreadPoolExecutor(max_workers=len(kinds)) as pool:
        results = list(pool.map(call, kinds, timeout=REQUEST_TIMEOUT_S * 2))
    assert len(results) == 32
    for (fn, stream), (text, tokens) in zip(kinds, results, strict=True):
        assert text, f"{fn.__name__} stream={stream} returned no text"
        assert tokens == MAX_TOKENS, f"{fn.__name__} stream={stream}: {tokens} tokens"
