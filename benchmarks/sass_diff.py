"""How far a decode version's hot loops moved from the shipped decode's, in SASS (no GPU).

    python benchmarks/sass_diff.py benchmarks/kernel_versions/<name>.cu [--show]

Compiles both for sm_90a (bf16), normalises the SASS (opcodes and operand shapes: registers,
predicates, immediates and labels renamed away), aligns the two with difflib, and counts the
shipped lines left unmatched in the windows of 40 lines around each wgmma. A change that
should leave the hot loops alone (a new path after them, a producer tweak) should leave that
count near zero; v23 moved 247 of 691 lines and lost 5.6% on rows where its new path was dead.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re

import torch

from flashmla_backend.kernel_sources import KernelModule, decode_launch_defines
from flashmla_backend.offline_compile import compile_to_cubin, disassemble

WINDOW = 40
_LINE = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;?\s*(/\*.*)?$")


def normalised_sass(source_file: str | None) -> list[str]:
    """The SASS (bf16) of a decode source (None: the shipped one) as a list of
    operand-shape-normalised instructions."""
    module = KernelModule(source_file or "mla_decode.cu", ("mla_decode",), torch.bfloat16, decode_launch_defines())
    text = disassemble(compile_to_cubin(module)[0])
    out = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match or not match.group(1) or match.group(1).startswith("."):
            continue
        ins = re.sub(r"0x[0-9a-f]+", "IMM", match.group(1))
        ins = re.sub(r"\bU?R\d+\b", "R", ins)
        ins = re.sub(r"\bU?P\d\b", "P", ins)
        out.append(re.sub(r"`\(\.L_x_\d+\)", "L", ins))
    return out


def hot_loop_drift(shipped: list[str], version: list[str]) -> tuple[int, int, list[tuple]]:
    """(lines in the wgmma windows of ``shipped``, how many of them ``version`` does not
    match, the differing opcode ranges that touch those windows)."""
    matcher = difflib.SequenceMatcher(None, shipped, version, autojunk=False)
    covered = [False] * len(shipped)
    for block in matcher.get_matching_blocks():
        for i in range(block.a, block.a + block.size):
            covered[i] = True
    near: set[int] = set()
    for i, line in enumerate(shipped):
        if "HGMMA" in line:
            near.update(range(max(0, i - WINDOW), min(len(shipped), i + WINDOW)))
    changes = [op for op in matcher.get_opcodes() if op[0] != "equal"
               and any(i in near for i in range(op[1], max(op[2], op[1] + 1)))]
    return len(near), sum(1 for i in near if not covered[i]), changes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", help="a decode source (e.g. benchmarks/kernel_versions/<name>.cu)")
    parser.add_argument("--show", action="store_true", help="print the differing ranges too")
    args = parser.parse_args()
    shipped, version = normalised_sass(None), normalised_sass(os.path.abspath(args.version))
    window, moved, changes = hot_loop_drift(shipped, version)
    print(f"{os.path.basename(args.version)}: {len(version)} instructions (shipped {len(shipped)}); "
          f"{moved} of {window} shipped lines around the wgmmas unmatched")
    if args.show:
        for tag, i1, i2, j1, j2 in changes:
            print(f"{tag} shipped[{i1}:{i2}] version[{j1}:{j2}]")
            for line in shipped[i1:i2][:6]:
                print("   -", line[:100])
            for line in version[j1:j2][:6]:
                print("   +", line[:100])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
