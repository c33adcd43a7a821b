"""Prints one markdown table of the ours-only timings in several ``bench.json`` files (one column
per file, named by its folder), with each version's ratio to the mean of the ``shipped`` runs.

    python benchmarks/ab_table.py OUT/bench1-shipped/bench.json OUT/bench2-v1m2/bench.json ...
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def case_label(case: dict) -> str:
    """``regime: b, s_q, h_q, s_k`` as in the benchmark's own table."""
    s_k = f"varlen {case['s_k']}" if case["varlen"] else str(case["s_k"])
    return f"{case['regime']}: {case['batch']}, {case['s_q']}, {case['h_q']}, {s_k}"


def main(paths: list[str]) -> None:
    runs = {Path(p).parent.name: json.loads(Path(p).read_text()) for p in paths}
    names = list(runs)
    shipped = [n for n in names if n.endswith("-shipped")]
    print(f"card: {next(iter(runs.values()))['card']}; µs, median of the benchmark's timed calls")
    print("| case | " + " | ".join(names) + " | " + " | ".join(f"speed-up of {n} (shipped ÷ it)" for n in names
                                                         if n not in shipped) + " |")
    print("|---" * (1 + len(names) + len(names) - len(shipped)) + "|")
    by_case = {n: {case_label(r["case"]): r["us"]["ours"] for r in runs[n]["rows"]} for n in names}
    for label in by_case[names[0]]:
        values = [by_case[n].get(label) for n in names]
        base = statistics.fmean(by_case[n][label] for n in shipped if label in by_case[n]) if shipped else None
        ratios = [f"{base / by_case[n][label]:.3f}x" if base and label in by_case[n] else "n/a"
                  for n in names if n not in shipped]
        cells = " | ".join("n/a" if v is None else f"{v:.1f}" for v in values)
        print(f"| {label} | {cells} | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
