"""A bounded serving soak against an OpenAI-compatible server (``vllm serve``).

:func:`make_jobs` draws a reproducible request mix: completions (token-id prompts of 1 to
3000 tokens, some sharing a 512-token prefix) and chats (short text), streamed or not, with
1 to 64 generated tokens, and a share of cancellations: streams closed after a few chunks, and
non-streamed requests given up by a short client timeout. :func:`run_jobs` sends them from
``concurrency`` streams (each stream sends its next request when the previous one ends) and
records what happened to each. Greedy *probe* requests (:func:`make_probes`) return their
tokens and top logprobs so that answers given under load can be compared with answers given
alone (:func:`compare_probe`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: Words the chat prompts are made of (made-up, like the tiny tokenizer's training corpus).
SYLLABLES = ["ba", "ko", "li", "de", "mu", "fe", "sa", "go", "ri", "lu", "ne", "ta", "vi", "zo"]
#: Two near-tied candidates may swap between two correct runs (bf16 rounding); see compare_probe.
PROBE_TIE_ATOL = 0.1
PROBE_MAX_TOKENS = 24
PROBE_LOGPROBS = 5


@dataclass
class Job:
    """One request of the soak."""

    index: int
    api: str  # "completion" or "chat"
    stream: bool
    prompt: list[int] | str
    max_tokens: int
    temperature: float = 0.0
    #: Streams: close the stream after this many chunks.
    cancel_after_chunks: int | None = None
    #: Non-streamed: give the request up after this many seconds (if not answered by then).
    cancel_after_s: float | None = None
    #: Probe number: a greedy completion whose tokens and top logprobs are kept.
    probe: int | None = None


@dataclass
class Outcome:
    """What happened to one job: ``status`` is "ok", "cancelled" or "error"."""

    index: int
    status: str
    detail: str = ""
    completion_tokens: int | None = None
    seconds: float = 0.0
    #: ``time.perf_counter()`` when the request was sent.
    started_at: float = 0.0
    tokens: list[str] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)


def _words(rng: random.Random, count: int) -> str:
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(count))


def _prompt_length(rng: random.Random) -> int:
    """Mostly short prompts, some medium, a few long ones (up to 3000 tokens)."""
    roll = rng.random()
    if roll < 0.6:
        return rng.randint(1, 128)
    if roll < 0.92:
        return rng.randint(129, 1024)
    return rng.randint(1025, 3000)


def make_jobs(count: int, vocab_size: int, seed: int, first_index: int = 0,
              cancel_fraction: float = 0.1) -> list[Job]:
    """``count`` jobs of the soak mix (see the module docstring); token ids avoid 0..5 (specials)."""
    rng = random.Random(seed)
    shared_prefix = [rng.randrange(6, vocab_size) for _ in range(512)]
    jobs = []
    for i in range(count):
        stream = rng.random() < 0.5
        max_tokens = rng.randint(1, 64)
        temperature = 0.0 if rng.random() < 0.5 else 0.8
        if rng.random() < 0.75:
            length = _prompt_length(rng)
            prompt: list[int] | str = [rng.randrange(6, vocab_size) for _ in range(length)]
            if rng.random() < 0.2:
                prompt = shared_prefix + prompt[: max(1, length - 512)]
            api = "completion"
        else:
            prompt = _words(rng, rng.randint(3, 300))
            api = "chat"
        job = Job(first_index + i, api, stream, prompt, max_tokens, temperature)
        if rng.random() < cancel_fraction:
            if stream:
                job.cancel_after_chunks = rng.randint(1, 4)
                job.max_tokens = max(job.max_tokens, 16)
            else:
                job.cancel_after_s = rng.uniform(0.02, 0.5)
        jobs.append(job)
    return jobs


def make_prefill_burst(count: int, vocab_size: int, seed: int, first_index: int,
                       min_len: int = 2048, max_len: int = 3800, max_tokens: int = 4) -> list[Job]:
    """``count`` greedy, non-streamed completions of long distinct token-id prompts (no shared
    prefix, so no prefix-cache hit): sent at once, they fill the engine's batches to its token
    budget with many chunked prefills, the batch that made the soak's one cache step in run 32
    (64 requests, 7202 tokens, 23 prefills)."""
    rng = random.Random(seed)
    return [Job(first_index + i, "completion", False,
                [rng.randrange(6, vocab_size) for _ in range(rng.randint(min_len, max_len))], max_tokens)
            for i in range(count)]


def make_probes(lengths: list[int], vocab_size: int, seed: int) -> list[Job]:
    """Greedy, non-streamed completions of token-id prompts of the given lengths."""
    rng = random.Random(seed)
    return [Job(-1, "completion", False, [rng.randrange(6, vocab_size) for _ in range(n)], PROBE_MAX_TOKENS,
                probe=p) for p, n in enumerate(lengths)]


async def _run_completion(client: Any, model: str, job: Job, outcome: Outcome) -> None:
    kwargs: dict[str, Any] = dict(model=model, prompt=job.prompt, max_tokens=job.max_tokens,
                                  temperature=job.temperature, extra_body={"ignore_eos": True})
    if job.probe is not None:
        kwargs["logprobs"] = PROBE_LOGPROBS
    if not job.stream:
        response = await client.completions.create(**kwargs)
        choice = response.choices[0]
        outcome.completion_tokens = response.usage.completion_tokens
        if choice.finish_reason != "length":
            raise AssertionError(f"finish_reason {choice.finish_reason!r}, expected 'length'")
        if job.probe is not None:
            outcome.tokens = list(choice.logprobs.tokens)
            outcome.top_logprobs = [dict(top) for top in choice.logprobs.top_logprobs]
        return
    stream = await client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    await _consume_stream(stream, job, outcome, lambda choice: choice.text)


async def _run_chat(client: Any, model: str, job: Job, outcome: Outcome) -> None:
    kwargs: dict[str, Any] = dict(model=model, messages=[{"role": "user", "content": job.prompt}],
                                  max_tokens=job.max_tokens, temperature=job.temperature,
                                  extra_body={"ignore_eos": True})
    if not job.stream:
        response = await client.chat.completions.create(**kwargs)
        outcome.completion_tokens = response.usage.completion_tokens
        if response.choices[0].finish_reason != "length":
            raise AssertionError(f"finish_reason {response.choices[0].finish_reason!r}, expected 'length'")
        return
    stream = await client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    await _consume_stream(stream, job, outcome, lambda choice: choice.delta.content)


async def _consume_stream(stream: Any, job: Job, outcome: Outcome, text_of: Any) -> None:
    chunks = 0
    finish = []
    try:
        async for chunk in stream:
            if chunk.usage is not None:
                outcome.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text_of(choice)  # every chunk must parse as the API's type
                if choice.finish_reason:
                    finish.append(choice.finish_reason)
            chunks += 1
            if job.cancel_after_chunks is not None and chunks >= job.cancel_after_chunks:
                outcome.status = "cancelled"
                outcome.detail = f"stream closed after {chunks} chunks"
                return
    finally:
        await stream.close()
    if finish != ["length"]:
        raise AssertionError(f"stream finish reasons {finish}, expected ['length']")


async def run_job(client: Any, model: str, job: Job) -> Outcome:
    """Sends one job; never raises: failures become ``status == "error"`` with the reason."""
    import openai

    started = time.perf_counter()
    outcome = Outcome(job.index, "ok", started_at=started)
    try:
        call = _run_completion if job.api == "completion" else _run_chat
        if job.cancel_after_s is not None:
            await asyncio.wait_for(call(client, model, job, outcome), timeout=job.cancel_after_s)
        else:
            await call(client, model, job, outcome)
        if outcome.status == "ok" and outcome.completion_tokens != job.max_tokens:
            raise AssertionError(f"{outcome.completion_tokens} completion tokens, expected {job.max_tokens}")
    except (asyncio.TimeoutError, openai.APITimeoutError):
        if job.cancel_after_s is None:
            outcome.status, outcome.detail = "error", "timed out"
        else:
            outcome.status, outcome.detail = "cancelled", f"given up after {job.cancel_after_s:.2f} s"
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none ends the soak
        outcome.status, outcome.detail = "error", f"{type(exc).__name__}: {exc}"
    outcome.seconds = time.perf_counter() - started
    return outcome


async def run_jobs_async(base_url: str, model: str, jobs: list[Job], concurrency: int,
                         request_timeout_s: float = 300.0) -> list[Outcome]:
    """Sends ``jobs`` from ``concurrency`` streams; outcomes in job order."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=request_timeout_s, max_retries=0)
    queue: asyncio.Queue[tuple[int, Job]] = asyncio.Queue()
    for position, job in enumerate(jobs):
        queue.put_nowait((position, job))
    outcomes: list[Outcome | None] = [None] * len(jobs)

    async def stream_worker() -> None:
        while True:
            try:
                position, job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            outcomes[position] = await run_job(client, model, job)

    try:
        await asyncio.gather(*(stream_worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return [o for o in outcomes if o is not None]


def run_jobs(base_url: str, model: str, jobs: list[Job], concurrency: int) -> list[Outcome]:
    """:func:`run_jobs_async` from synchronous code."""
    return asyncio.run(run_jobs_async(base_url, model, jobs, concurrency))


def summarize(jobs: list[Job], outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts by status, API and streaming, and the first few errors."""
    by_status = Counter(o.status for o in outcomes)
    kinds = Counter(f"{j.api}/{'stream' if j.stream else 'plain'}" for j in jobs)
    errors = [f"job {o.index}: {o.detail}" for o in outcomes if o.status == "error"]
    seconds = sorted(o.seconds for o in outcomes if o.status == "ok")
    return {"requests": len(outcomes), "status": dict(by_status), "kinds": dict(kinds),
            "cancel_planned": sum(j.cancel_after_chunks is not None or j.cancel_after_s is not None for j in jobs),
            "p50_s": seconds[len(seconds) // 2] if seconds else None,
            "p99_s": seconds[int(len(seconds) * 0.99)] if seconds else None,
            "errors": errors[:20]}


def in_flight_at(jobs: list[Job], outcomes: list[Outcome], when: float, before_s: float = 1.0) -> dict[str, Any]:
    """The requests in flight at ``when`` (a ``time.perf_counter()`` value) or ending within
    ``before_s`` before it: how many, the probes among them, and the five longest prompts, to
    match a step in the used memory (sampled every 0.25 s) to the requests that may have caused it."""
    active = [j for j, o in zip(jobs, outcomes, strict=True)
              if o.started_at <= when and o.started_at + o.seconds >= when - before_s]

    def tokens(job: Job) -> int:  # chats (text prompts) are short: they sort last
        return len(job.prompt) if isinstance(job.prompt, list) else 0

    def describe(job: Job) -> str:
        size = f"{tokens(job)} tokens" if isinstance(job.prompt, list) else f"{len(job.prompt.split())} words"
        return f"{job.api}/{'stream' if job.stream else 'plain'} {size}"

    return {"requests": len(active),
            "probes": [describe(j) for j in active if j.probe is not None],
            "longest": [describe(j) for j in sorted(active, key=tokens, reverse=True)[:5]]}


def compare_probe(alone: Outcome, under_load: Outcome, tie_atol: float = PROBE_TIE_ATOL) -> str | None:
    """``None`` when the probe's greedy tokens agree; else what differs.

    Tokens must be identical, or identical up to a position where the two answers pick two
    candidates that each appear in the other's top logprobs and that the lone run rates within
    ``tie_atol`` (a near tie that rounding in a different batch may flip).
    """
    if alone.status != "ok" or under_load.status != "ok":
        return f"probe not answered: alone {alone.status} {alone.detail}, under load {under_load.status} {under_load.detail}"
    for i, (a, b) in enumerate(zip(alone.tokens, under_load.tokens, strict=False)):
        if a == b:
            continue
        top_a, top_b = alone.top_logprobs[i], under_load.top_logprobs[i]
        if b not in top_a or a not in top_b:
            return f"token {i}: {a!r} vs {b!r}, not in each other's top {PROBE_LOGPROBS}"
        if abs(top_a[a] - top_a[b]) > tie_atol:
            return f"token {i}: {a!r} vs {b!r} is no near tie ({top_a[a]:.4f} vs {top_a[b]:.4f})"
        return None
    if len(alone.tokens) != len(under_load.tokens):
        return f"{len(alone.tokens)} vs {len(under_load.tokens)} tokens"
    return None
