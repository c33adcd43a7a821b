"""Hot spots of Nsight Compute's per-instruction warp-state sampling (the ``--page source
--csv --print-source sass`` table of one profiled launch).

    python benchmarks/stall_hotspots.py REPORT.sass.csv [--top 25]

Prints the instructions holding the most samples (share of all samples, the SASS text, and
the largest per-reason stall columns the table has), then the samples summed per opcode. The
column names are found by their wording ("Sampl", "stall"), so the table of any recent ncu
version reads.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read_table(path: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the SASS table: the header is the first row naming a Source column."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    for i, row in enumerate(rows):
        if any(cell.strip() == "Source" for cell in row):
            return row, [r for r in rows[i + 1:] if len(r) == len(row)]
    raise ValueError(f"{path}: no header row with a 'Source' column")


def hotspots(header: list[str], rows: list[list[str]], top: int) -> list[str]:
    """Report lines: the top instructions by samples, then the samples per opcode."""
    source = [h.strip() for h in header].index("Source")
    address = next((i for i, h in enumerate(header) if "Address" in h), None)
    sample_cols = [i for i, h in enumerate(header) if "Sampl" in h]
    if not sample_cols:
        raise ValueError("no sampling column (was the SourceCounters section collected?)")
    total_col = next((i for i in sample_cols if "All" in header[i]), sample_cols[0])
    reason_cols = [i for i, h in enumerate(header) if "stall" in h.lower() and i not in sample_cols]
    total = sum(_number(r[total_col]) for r in rows) or 1.0
    lines = [f"{len(rows)} instructions, {total:.0f} samples ({header[total_col]})"]
    for r in sorted(rows, key=lambda r: -_number(r[total_col]))[:top]:
        samples = _number(r[total_col])
        if samples <= 0:
            break
        reasons = sorted(((_number(r[i]), header[i]) for i in reason_cols), reverse=True)[:3]
        why = ", ".join(f"{name} {value:.0f}" for value, name in reasons if value > 0)
        where = r[address] if address is not None else ""
        lines.append(f"{100 * samples / total:5.1f}%  {where:>8}  {r[source].strip()[:70]:70}  {why}")
    per_opcode: dict[str, float] = defaultdict(float)
    for r in rows:
        text = r[source].strip()
        words = text.split()
        opcode = (words[1] if words and words[0].startswith("@") and len(words) > 1 else words[0]) if words else "?"
        per_opcode[opcode.split(".")[0]] += _number(r[total_col])
    lines.append("per opcode: " + ", ".join(f"{op} {100 * v / total:.1f}%" for op, v in
                                           sorted(per_opcode.items(), key=lambda kv: -kv[1])[:12]))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    try:
        header, rows = read_table(args.table)
        print("\n".join(hotspots(header, rows, args.top)))
    except (OSError, ValueError) as exc:
        print(f"stall_hotspots: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
