"""The rule that picks where split requests are merged (``flashmla_backend/split_merge.py``)
and the decode contract that lets a source merge them itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashmla_backend.kernel_sources import decode_launch_contract, decode_module
from flashmla_backend.split_merge import SPLIT_MERGE_ENV, merge_in_decode, split_merge_setting

ARCHIVED = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_versions"


def test_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SPLIT_MERGE_ENV, raising=False)
    assert split_merge_setting() == "auto"
    monkeypatch.setenv(SPLIT_MERGE_ENV, "fused")
    with pytest.raises(ValueError, match=SPLIT_MERGE_ENV):
        split_merge_setting()


@pytest.mark.parametrize("batch,parts,expected", [(128, 132, True), (66, 132, True), (65, 132, False),
                                                  (1, 132, False), (8, 66, False), (40, 66, True)])
def test_auto_merges_in_the_decode_only_for_few_parts_per_request(
        monkeypatch: pytest.MonkeyPatch, batch: int, parts: int, expected: bool) -> None:
    monkeypatch.delenv(SPLIT_MERGE_ENV, raising=False)
    assert merge_in_decode(batch, parts) is expected


def test_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SPLIT_MERGE_ENV, "decode")
    assert merge_in_decode(1, 132)
    monkeypatch.setenv(SPLIT_MERGE_ENV, "combine")
    assert not merge_in_decode(128, 132)


def test_contract_of_the_merging_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # v24 declares the merge (its launch takes the counters); a source declaring it without the
    # producer choice, after which the counters argument sits, is refused.
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_FILE", str(ARCHIVED / "mla_decode_v24_merge_at_part_end.cu"))
    assert decode_launch_contract(decode_module(torch.bfloat16)).merges_splits
    bad = tmp_path / "merge_without_choice.cu"
    bad.write_text("constexpr bool TAKES_KV_POINTER = true;\nconstexpr bool MERGES_SPLITS = true;\n")
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_FILE", str(bad))
    with pytest.raises(ValueError, match="SELECTS_KV_PRODUCER"):
        decode_launch_contract(decode_module(torch.bfloat16))
