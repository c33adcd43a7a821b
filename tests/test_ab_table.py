"""The A/B table of ``benchmarks/ab_table.py`` (CPU only): columns per run, speed-ups against
the mean of the shipped runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ab_table.py"


def write_run(folder: Path, microseconds: float) -> Path:
    folder.mkdir(parents=True)
    case = {"regime": "memory", "batch": 128, "s_q": 1, "h_q": 16, "s_k": 4096, "varlen": False}
    path = folder / "bench.json"
    path.write_text(json.dumps({"card": "NVIDIA H200", "rows": [{"case": case, "us": {"ours": microseconds}}]}))
    return path


def test_speed_up_is_against_the_mean_of_the_shipped_runs(tmp_path: Path) -> None:
    paths = [write_run(tmp_path / "bench1-shipped", 100.0), write_run(tmp_path / "bench2-v6", 80.0),
             write_run(tmp_path / "bench3-shipped", 120.0)]
    out = subprocess.run([sys.executable, str(SCRIPT), *map(str, paths)], capture_output=True, text=True,
                         check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("| memory: 128, 1, 16, 4096"))
    assert row == "| memory: 128, 1, 16, 4096 | 100.0 | 80.0 | 120.0 | 1.375x |"
    assert "NVIDIA H200" in out
