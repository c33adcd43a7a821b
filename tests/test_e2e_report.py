"""The end-to-end benchmark's table (``benchmarks/e2e_vllm.py``), from saved per-backend results;
CPU only, no vLLM needed."""

from __future__ import annotations

import pytest

from benchmark_scripts import load_benchmark_script


@pytest.fixture(scope="module")
def e2e():
    return load_benchmark_script("e2e_vllm")


def result(backend: str, timings: list[tuple[float, float]], tokens: int = 1000) -> dict:
    runs = [{"repeat": i, "prefill_only_s": p, "full_s": f, "decode_s": f - p, "decode_tokens": tokens,
             "decode_tok_per_s": tokens / (f - p), "ttft_mean_s": 0.1, "ttft_median_s": 0.1}
            for i, (p, f) in enumerate(timings)]
    return {"backend": backend, "best": max(runs, key=lambda r: r["decode_tok_per_s"]), "runs": runs}


def test_fastest_timings_rate_does_not_reward_a_slow_prefill_run(e2e) -> None:
    # Repeat 1 has a slow prefill-only run (7 s): "best of repeats" takes its 1000 / (16 - 7),
    # the steadier estimate takes each timing at its best: 1000 / (16 - 6).
    r = result("CUSTOM", [(6.0, 17.0), (7.0, 16.0)])
    assert r["best"]["decode_tok_per_s"] == pytest.approx(1000 / 9)
    assert e2e.fastest_timings_rate(r) == pytest.approx(1000 / 10)


def test_table_gives_both_rates_relative_to_custom_and_marks_failures(e2e) -> None:
    table = e2e.markdown_table([result("CUSTOM", [(6.0, 16.0)]), result("FLASHMLA", [(6.0, 26.0)]),
                                {"backend": "TRITON_MLA", "error": "1"}])
    lines = table.splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == lines[4].count("|")
    custom, flashmla, triton = lines[2:]
    assert custom.startswith("| CUSTOM | 100 | 1.00x | 100 | 1.00x |")
    assert flashmla.startswith("| FLASHMLA | 50 | 0.50x | 50 | 0.50x |")
    assert "failed: 1" in triton


def test_swapped_placements_pool_repeats_and_give_each_pairings_ratio(e2e) -> None:
    # CUSTOM ran 100 tok/s on GPU 0 and 120 on GPU 1; FLASHMLA 90 on GPU 1 and 110 on GPU 0.
    custom = e2e.pool_placements(dict(result("CUSTOM", [(6.0, 16.0)]), cuda_visible_devices="0"),
                                 dict(result("CUSTOM", [(6.0, 6.0 + 1000 / 120)]), cuda_visible_devices="1"))
    flashmla = e2e.pool_placements(dict(result("FLASHMLA", [(6.0, 6.0 + 1000 / 90)]), cuda_visible_devices="1"),
                                   dict(result("FLASHMLA", [(6.0, 6.0 + 1000 / 110)]), cuda_visible_devices="0"))
    assert len(custom["runs"]) == 2 and custom["best"]["decode_tok_per_s"] == pytest.approx(120)
    assert [r["cuda_visible_devices"] for r in custom["runs"]] == ["0", "1"]
    (line,) = e2e.pairing_ratios([custom, flashmla])
    assert "1.111x with CUSTOM on GPU 0" in line and "1.091x with CUSTOM on GPU 1" in line
    assert f"geometric mean {(100 / 90 * 120 / 110) ** 0.5:.3f}x" in line


def test_a_failed_placement_keeps_the_other(e2e) -> None:
    ok = dict(result("CUSTOM", [(6.0, 16.0)]), cuda_visible_devices="0")
    assert e2e.pool_placements(ok, {"backend": "CUSTOM", "error": "1"}) is ok
    assert e2e.pool_placements({"backend": "CUSTOM", "error": "1"}, ok) is ok


def test_rounds_alternate_the_order(e2e) -> None:
    assert e2e.backend_orders(["CUSTOM", "FLASHMLA"], 3) == [["CUSTOM", "FLASHMLA"], ["FLASHMLA", "CUSTOM"],
                                                              ["CUSTOM", "FLASHMLA"]]
    assert e2e.parse_args(["--rounds", "2"]).rounds == 2
    with pytest.raises(SystemExit):
        e2e.parse_args(["--rounds", "2", "--parallel-gpus", "2"])
    with pytest.raises(SystemExit):
        e2e.parse_args(["--rounds", "0"])


def test_pooled_rounds_give_each_rounds_ratio_and_cancel_the_position(e2e) -> None:
    # Truly CUSTOM 100 tok/s and FLASHMLA 100 / 1.05; whoever runs first gets 10% more. Round 0:
    # 110 against 95.2 (1.155x); round 1: 100 against 104.8 (0.955x); the geometric mean is 1.05x.
    tags = [{"round": 0, "order": "CUSTOM then FLASHMLA"}, {"round": 1, "order": "FLASHMLA then CUSTOM"}]
    rate = lambda r: (6.0, 6.0 + 1000 / r)
    flash = 100 / 1.05
    custom = e2e.pool_passes([result("CUSTOM", [rate(110)]), result("CUSTOM", [rate(100)])], tags)
    flashmla = e2e.pool_passes([result("FLASHMLA", [rate(flash)]), result("FLASHMLA", [rate(1.1 * flash)])], tags)
    assert [r["round"] for r in custom["runs"]] == [0, 1]
    assert custom["best"]["decode_tok_per_s"] == pytest.approx(110)
    (line,) = e2e.pairing_ratios([custom, flashmla])
    assert "1.155x in round 0 (CUSTOM then FLASHMLA)" in line and "0.955x in round 1 (FLASHMLA then CUSTOM)" in line
    assert "geometric mean 1.050x" in line
    # A failed round leaves the other, with no per-pass ratio to print.
    alone = e2e.pool_passes([result("FLASHMLA", [rate(100)]), {"backend": "FLASHMLA", "error": "1"}], tags)
    assert "passes" not in alone and e2e.pairing_ratios([custom, alone]) == []


def test_rounds_pair_by_round_when_a_round_failed(e2e) -> None:
    # Three rounds; CUSTOM's round 1 and FLASHMLA's round 2 failed: only round 0 pairs, and one
    # pass alone gives no pooled ratio line.
    tags = [{"round": k, "order": "x"} for k in range(3)]
    rate = lambda r: (6.0, 6.0 + 1000 / r)
    failed = {"backend": "?", "error": "1"}
    custom = e2e.pool_passes([result("CUSTOM", [rate(100)]), failed, result("CUSTOM", [rate(100)])], tags)
    flashmla = e2e.pool_passes([result("FLASHMLA", [rate(90)]), result("FLASHMLA", [rate(90)]), failed], tags)
    assert [p["round"] for p in custom["passes"]] == [0, 2] and [p["round"] for p in flashmla["passes"]] == [0, 1]
    assert e2e.pairing_ratios([custom, flashmla]) == []


def test_a_slow_run_is_flagged_against_its_backends_fastest(e2e) -> None:
    # Run 28's shape: FLASHMLA's round 0 decoded in 7.0 s, its round 1 in 4.6 s (1.52x); CUSTOM's
    # two rounds differ by 5%, under the 10% tolerance. A single run flags nothing.
    tags = [{"round": 0, "order": "CUSTOM then FLASHMLA"}, {"round": 1, "order": "FLASHMLA then CUSTOM"}]
    custom = e2e.pool_passes([result("CUSTOM", [(3.0, 7.6)]), result("CUSTOM", [(3.0, 7.4)])], tags)
    flashmla = e2e.pool_passes([result("FLASHMLA", [(3.0, 10.0)]), result("FLASHMLA", [(3.0, 7.6)])], tags)
    (line,) = e2e.slow_runs([custom, flashmla])
    assert line.startswith("FLASHMLA in round 0 (CUSTOM then FLASHMLA), repeat 0: decode 7.00 s, 1.52x")
    assert e2e.slow_runs([result("CUSTOM", [(3.0, 10.0)])]) == []
    # Repeats of one pass are compared too, and a failed backend is skipped.
    repeats = result("TRITON_MLA", [(3.0, 7.0), (3.0, 8.0)])
    assert e2e.slow_runs([repeats, {"backend": "X", "error": "1"}]) == [
        "TRITON_MLA repeat 1: decode 5.00 s, 1.25x its fastest (4.00 s): slow run, a ratio that pairs it is suspect"]
