"""The serving soak's client logic on CPU (integration_tests/soak_client.py): the request mix
is reproducible and has what the soak promises, and the probe comparison accepts identical
answers and near ties only. The soak itself runs against ``vllm serve`` on the GPU machine."""

from __future__ import annotations

from integration_tests.soak_client import (
    PROBE_MAX_TOKENS,
    Outcome,
    compare_probe,
    in_flight_at,
    make_jobs,
    make_prefill_burst,
    make_probes,
    summarize,
)

VOCAB = 1024


def test_job_mix_is_reproducible_and_covers_the_promised_kinds() -> None:
    jobs = make_jobs(2000, VOCAB, seed=2, first_index=256)
    assert [j.__dict__ for j in jobs] == [j.__dict__ for j in make_jobs(2000, VOCAB, seed=2, first_index=256)]
    assert [j.index for j in jobs] == list(range(256, 2256))
    kinds = {(j.api, j.stream) for j in jobs}
    assert kinds == {("completion", True), ("completion", False), ("chat", True), ("chat", False)}
    token_prompts = [j.prompt for j in jobs if j.api == "completion"]
    assert all(isinstance(p, list) and all(6 <= t < VOCAB for t in p) for p in token_prompts)
    lengths = [len(p) for p in token_prompts]
    assert min(lengths) >= 1 and max(lengths) <= 3000 and max(lengths) > 2000
    assert all(1 <= j.max_tokens <= 64 for j in jobs)
    streams_cut = [j for j in jobs if j.cancel_after_chunks is not None]
    plain_cut = [j for j in jobs if j.cancel_after_s is not None]
    assert all(j.stream for j in streams_cut) and not any(j.stream for j in plain_cut)
    assert 0.05 < (len(streams_cut) + len(plain_cut)) / len(jobs) < 0.15
    assert {j.temperature for j in jobs} == {0.0, 0.8}


def test_prefill_burst_is_long_distinct_greedy_prompts_within_the_model_length() -> None:
    burst = make_prefill_burst(64, VOCAB, seed=9, first_index=200_000)
    assert [j.index for j in burst] == list(range(200_000, 200_064))
    assert all(j.api == "completion" and not j.stream and j.temperature == 0.0 for j in burst)
    assert all(j.cancel_after_chunks is None and j.cancel_after_s is None for j in burst)
    lengths = [len(j.prompt) for j in burst]
    assert min(lengths) >= 2048 and max(lengths) + max(j.max_tokens for j in burst) <= 4096  # --max-model-len
    # Together far past one batch's token budget (8192), so that many batches run at it.
    assert sum(lengths) > 20 * 8192
    # No two share a 512-token prefix (a prefix-cache hit would shrink the prefill).
    assert len({tuple(j.prompt[:512]) for j in burst}) == len(burst)


def test_probes_are_greedy_plain_completions() -> None:
    probes = make_probes([5, 700], VOCAB, seed=7)
    assert [len(p.prompt) for p in probes] == [5, 700]
    assert all(p.temperature == 0.0 and not p.stream and p.max_tokens == PROBE_MAX_TOKENS for p in probes)
    assert [p.probe for p in probes] == [0, 1]


def _answer(tokens: list[str], tops: list[dict[str, float]]) -> Outcome:
    return Outcome(index=-1, status="ok", tokens=tokens, top_logprobs=tops)


def test_probe_comparison_accepts_identity_and_near_ties_only() -> None:
    tops = [{"a": -0.1, "b": -2.0}, {"c": -0.50, "d": -0.55}, {"e": -0.2, "f": -3.0}]
    alone = _answer(["a", "c", "e"], tops)
    assert compare_probe(alone, _answer(["a", "c", "e"], tops)) is None
    # Position 1 is a near tie (0.05 apart): a flip there ends the comparison, accepted.
    flipped = _answer(["a", "d", "x"], [tops[0], {"d": -0.50, "c": -0.52}, {"x": -0.1}])
    assert compare_probe(alone, flipped) is None
    # Position 0 is no tie (1.9 apart): a flip there is a failure.
    assert "no near tie" in compare_probe(alone, _answer(["b", "c", "e"], [{"b": -0.1, "a": -0.2}, tops[1], tops[2]]))
    # A token outside the other's top list is a failure.
    assert "top" in compare_probe(alone, _answer(["z", "c", "e"], [{"z": -0.1}, tops[1], tops[2]]))
    assert "tokens" in compare_probe(alone, _answer(["a", "c"], tops[:2]))
    assert "not answered" in compare_probe(alone, Outcome(index=-1, status="error", detail="boom"))


def test_summary_counts_statuses_and_lists_errors() -> None:
    jobs = make_jobs(4, VOCAB, seed=0)
    outcomes = [Outcome(j.index, s, detail="x" if s == "error" else "", seconds=1.0)
                for j, s in zip(jobs, ["ok", "ok", "cancelled", "error"], strict=True)]
    summary = summarize(jobs, outcomes)
    assert summary["requests"] == 4
    assert summary["status"] == {"ok": 2, "cancelled": 1, "error": 1}
    assert summary["errors"] == [f"job {jobs[3].index}: x"]


def test_in_flight_at_lists_the_requests_around_a_memory_step() -> None:
    jobs = make_jobs(3, VOCAB, seed=5) + make_probes([3000], VOCAB, seed=7)
    jobs[0].prompt, jobs[1].prompt, jobs[2].prompt = [7] * 10, [7] * 2000, "ba ko li"
    # Sent at 0, 1, 2 and 3 s; each takes 1.5 s.
    outcomes = [Outcome(j.index, "ok", seconds=1.5, started_at=float(i)) for i, j in enumerate(jobs)]
    at_3_2 = in_flight_at(jobs, outcomes, 3.2, before_s=0.0)  # jobs 2 (2.0-3.5) and the probe (3.0-4.5)
    assert at_3_2["requests"] == 2
    assert at_3_2["probes"] == ["completion/plain 3000 tokens"]
    assert at_3_2["longest"][0] == "completion/plain 3000 tokens"
    # A request that ended within before_s counts too: job 1 ended at 2.5.
    assert in_flight_at(jobs, outcomes, 3.2, before_s=1.0)["requests"] == 3
    assert in_flight_at(jobs, outcomes, 3.2, before_s=1.0)["longest"][:2] == [
        "completion/plain 3000 tokens", f"{jobs[1].api}/{'stream' if jobs[1].stream else 'plain'} 2000 tokens"]
    assert in_flight_at(jobs, outcomes, 10.0)["requests"] == 0
