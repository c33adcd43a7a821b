"""``flashmla_backend/settings.py``: every FLASHMLA_BACKEND_* variable parsed once, defaults when
unset or empty, a bad value refused with the variable's name, re-read after ``reload_settings``."""

from __future__ import annotations

import pytest

from flashmla_backend import settings as S


def test_defaults_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DECODE_FILE", "DECODE_DEFINES", "COMBINE_FILE", "COMBINE_DEFINES", "KV_PRODUCER", "PDL",
                 "MAX_SM_PARTS", "SPLIT_OVERHEAD", "NO_SPLIT_SLACK", "TMA_L2_PROMOTION", "SMALL_SCHEDULE",
                 "COMBINE_REQUESTS_PER_CTA", "WHOLE_REQUESTS", "CHECK_CONTENTS", "SPLIT_QUERY",
                 "FEW_ROWS_DECODE_FILE"):
        monkeypatch.delenv(f"FLASHMLA_BACKEND_{name}", raising=False)
    assert S.settings() == S.Settings()


def test_parsed_once_until_reload() -> None:
    first = S.settings()
    assert S.settings() is first
    S.reload_settings()
    assert S.settings() is not first and S.settings() == first


def test_values_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHMLA_BACKEND_DECODE_DEFINES", " -DA=1  -DB ")
    monkeypatch.setenv("FLASHMLA_BACKEND_COMBINE_FILE", "/tmp/x.cu")
    monkeypatch.setenv("FLASHMLA_BACKEND_PDL", "0")
    monkeypatch.setenv("FLASHMLA_BACKEND_MAX_SM_PARTS", "64")
    monkeypatch.setenv("FLASHMLA_BACKEND_SPLIT_OVERHEAD", "3")
    monkeypatch.setenv("FLASHMLA_BACKEND_CHECK_CONTENTS", "0")
    monkeypatch.setenv("FLASHMLA_BACKEND_SMALL_SCHEDULE", "0")
    monkeypatch.setenv("FLASHMLA_BACKEND_COMBINE_REQUESTS_PER_CTA", "4")
    monkeypatch.setenv("FLASHMLA_BACKEND_WHOLE_REQUESTS", "0")
    monkeypatch.setenv("FLASHMLA_BACKEND_FEW_ROWS_DECODE_FILE", "/tmp/few.cu")
    s = S.settings()
    assert s.few_rows_decode_file == "/tmp/few.cu" and S.Settings().few_rows_decode_file == ""
    assert s.decode_defines == ("-DA=1", "-DB") and s.combine_file == "/tmp/x.cu"
    assert not s.programmatic_launch and s.max_sm_parts == 64 and s.split_overhead_pages == 3
    assert not s.check_contents and not s.small_schedule and s.combine_requests_per_cta == 4
    assert not s.whole_requests and S.Settings().whole_requests


@pytest.mark.parametrize(("name", "value"), [
    ("FLASHMLA_BACKEND_DECODE_DEFINES", "-DA=1 B"),
    ("FLASHMLA_BACKEND_COMBINE_DEFINES", "X"),
    ("FLASHMLA_BACKEND_KV_PRODUCER", "dma"),
    ("FLASHMLA_BACKEND_MAX_SM_PARTS", "0"),
    ("FLASHMLA_BACKEND_SPLIT_OVERHEAD", "0"),
    ("FLASHMLA_BACKEND_SPLIT_OVERHEAD", "five"),
    ("FLASHMLA_BACKEND_NO_SPLIT_SLACK", "17"),
    ("FLASHMLA_BACKEND_TMA_L2_PROMOTION", "4"),
    ("FLASHMLA_BACKEND_PDL", "yes"),
    ("FLASHMLA_BACKEND_PDL", "2"),
    ("FLASHMLA_BACKEND_SMALL_SCHEDULE", "on"),
    ("FLASHMLA_BACKEND_SMALL_SCHEDULE", "2"),
    ("FLASHMLA_BACKEND_COMBINE_REQUESTS_PER_CTA", "-1"),
    ("FLASHMLA_BACKEND_COMBINE_REQUESTS_PER_CTA", "33"),
    ("FLASHMLA_BACKEND_WHOLE_REQUESTS", "2"),
    ("FLASHMLA_BACKEND_WHOLE_REQUESTS", "yes"),
])
def test_bad_values_name_their_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        S.settings()
