"""The end-to-end benchmark's table (``benchmarks/e2e_vllm.py``), from saved per-backend results;
CPU only, no vLLM needed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e_vllm.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("e2e_vllm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
