"""The CPU side of ``benchmarks/clock_probe.py``: row selection, the nvidia-smi sample summary
and the sustained table (ours ÷ the best peer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark_script


@pytest.fixture(scope="module")
def probe():
    return load_benchmark_script("clock_probe")


def test_rows_by_id_and_alias_without_repeats(probe) -> None:
    assert probe.resolve_rows(["compute"]) == ["128x1x128x4096"]
    rows = probe.resolve_rows(["memory", "anchors"])
    assert rows[0] == "32x1x16x32768" and rows.count("32x1x16x32768") == 1
    assert "128x2x128x8192v" in rows  # a varlen row carries its v
    assert "1x1x16x8192" not in rows and "8x1x128x2048" not in rows  # latency rows: host-bound back to back
    assert probe.resolve_rows(["8x1x128x2048"]) == ["8x1x128x2048"]


def test_unknown_row_names_the_argument_and_the_choices(probe) -> None:
    with pytest.raises(ValueError, match=r"--rows: unknown row '4x4'.*anchors"):
        probe.resolve_rows(["4x4"])


def test_summary_skips_the_first_second_and_unreadable_fields(probe, tmp_path: Path) -> None:
    lines = [f"1980, 3201, 300.00, 40, 0x0000000000000000" for _ in range(10)]
    lines += [f"{1500 + 10 * i}, 3201, 690.50, 5{i}, 0x0000000000000004" for i in range(5)]
    lines.append("[N/A], 3201, [N/A], 55, 0x0000000000000004")
    log = tmp_path / "samples.csv"
    log.write_text("\n".join(lines) + "\n")
    s = probe.summarize(log)
    assert s["samples"] == 6
    assert s["sm_mhz"] == 1520 and s["power_w"] == 690.5 and s["max_temp_c"] == 55
    assert s["reasons"] == ["0x0000000000000004"]


def test_sustained_table_ratio_is_best_peer_over_ours(probe) -> None:
    per_call = {("128x1x128x4096", "ours"): [300.0, 310.0, 302.0],
                ("128x1x128x4096", "FlashMLA"): [282.0, 280.0],
                ("128x1x128x4096", "FA3-MLA"): [292.0, 294.0],
                ("32x1x16x32768", "ours"): [314.0, 314.0]}
    lines = probe.sustained_table(per_call, ["128x1x128x4096", "32x1x16x32768"], ["ours", "FA3-MLA", "FlashMLA"])
    assert lines[2] == "| 128x1x128x4096 | 302.0 | 293.0 | 281.0 | 0.93x |"
    assert lines[3] == "| 32x1x16x32768 | 314.0 | n/a | n/a | n/a |"
