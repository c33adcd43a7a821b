"""The benchmark's ``--case`` rows (``flashmla_backend.bench.parse_case``), CPU only."""

from __future__ import annotations

import argparse

import pytest

from flashmla_backend.bench import ANCHOR_CASES, Case, parse_case


def test_a_case_round_trips_through_its_label() -> None:
    assert parse_case("memory:132,1,16,4096") == Case("memory", 132, 1, 16, 4096)
    assert parse_case("compute: 8, 2, 128, 2048, varlen") == Case("compute", 8, 2, 128, 2048, True)
    for case in ANCHOR_CASES:  # an anchor row written as --case is that row
        regime, shape = case.label.split(": ")
        text = f"{regime}:{shape.replace('varlen ', '')}" + (",varlen" if case.varlen else "")
        assert parse_case(text) == case


@pytest.mark.parametrize("text", ["132,1,16,4096", ":132,1,16,4096", "memory:132,1,16",
                                  "memory:132,1,16,4096,5", "memory:132,0,16,4096", "memory:a,1,16,4096"])
def test_a_malformed_case_names_the_expected_form(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"REGIME:B,S_Q,H_Q,S_K"):
        parse_case(text)
