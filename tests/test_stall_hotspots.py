"""The table reading of ``benchmarks/stall_hotspots.py`` (CPU only) on a small table shaped
like ncu's ``--page source --csv --print-source sass`` output."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark_script


stall_hotspots = load_benchmark_script("stall_hotspots")

TABLE = '''"Kernel Name","mla_decode"
"# Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","stall_long_sb","stall_barrier"
"0x100","LDG.E.CONSTANT R4, desc[UR4][R2.64] ;","10","9","9","0"
"0x110","@!P0 SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR12], R4 ;","60","58","0","0"
"0x120","HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ ;","30","5","0","1"
"0x130","BAR.SYNC.DEFER_BLOCKING 0x2, 0x80 ;","0","0","0","0"
'''


def test_hot_spots_in_sample_order_with_reasons_and_opcodes(tmp_path: Path) -> None:
    path = tmp_path / "t.sass.csv"
    path.write_text(TABLE)
    header, rows = stall_hotspots.read_table(str(path))
    assert len(rows) == 4
    lines = stall_hotspots.hotspots(header, rows, top=5)
    assert lines[0].startswith("4 instructions, 100 samples")
    assert "60.0%" in lines[1] and "SYNCS.PHASECHK" in lines[1]
    assert "30.0%" in lines[2] and "HGMMA" in lines[2] and "stall_barrier 1" in lines[2]
    assert "stall_long_sb 9" in lines[3]
    assert len(lines) == 5  # the zero-sample BAR row is not listed; then the opcode line
    assert lines[-1].startswith("per opcode: SYNCS 60.0%, HGMMA 30.0%, LDG 10.0%")


def test_a_table_without_samples_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.sass.csv"
    path.write_text('"Address","Source","Instructions Executed"\n"0x1","NOP ;","3"\n')
    header, rows = stall_hotspots.read_table(str(path))
    with pytest.raises(ValueError, match="sampling column"):
        stall_hotspots.hotspots(header, rows, top=5)
