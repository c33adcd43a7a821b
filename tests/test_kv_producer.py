"""The rule that picks the decode's KV producer (``flashmla_backend/kv_producer.py``)."""

from __future__ import annotations

import re

import pytest

from flashmla_backend.kernel_sources import assembled_source
from flashmla_backend.kv_producer import (
    CP_ASYNC_ALWAYS,
    KV_PRODUCER_ENV,
    SHORT_PART_PAGES,
    SHORT_PART_PAGES_ENV,
    card_prefers_cp_async,
    cp_async_part_pages,
    kv_producer_setting,
    short_part_pages,
)


@pytest.mark.parametrize("name,expected", [("NVIDIA H100 80GB HBM3", True), ("NVIDIA H100 PCIe", True),
                                           ("NVIDIA H200", False), ("NVIDIA H20", False),
                                           ("NVIDIA H800", False)])
def test_card_rule(name: str, expected: bool) -> None:
    assert card_prefers_cp_async(name) is expected


def test_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KV_PRODUCER_ENV, raising=False)
    assert kv_producer_setting() == "auto"
    monkeypatch.setenv(KV_PRODUCER_ENV, "")
    assert kv_producer_setting() == "auto"
    monkeypatch.setenv(KV_PRODUCER_ENV, "ldgsts")
    with pytest.raises(ValueError, match=KV_PRODUCER_ENV):
        kv_producer_setting()


@pytest.mark.parametrize("raw,expected", [("", SHORT_PART_PAGES), ("0", 0), ("40", 40), ("-1", None), ("x", None)])
def test_short_part_limit_is_checked(raw: str, expected: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SHORT_PART_PAGES_ENV, raw)
    if expected is None:
        with pytest.raises(ValueError, match=SHORT_PART_PAGES_ENV):
            short_part_pages()
    else:
        assert short_part_pages() == expected


def test_overrides_and_several_query_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Neither an override nor several query blocks needs to ask the device.
    monkeypatch.setenv(KV_PRODUCER_ENV, "tma")
    assert cp_async_part_pages(0, 1) == 0
    monkeypatch.setenv(KV_PRODUCER_ENV, "cp_async")
    assert cp_async_part_pages(0, 1) == cp_async_part_pages(0, 4) == CP_ASYNC_ALWAYS
    monkeypatch.setenv(KV_PRODUCER_ENV, "auto")
    assert cp_async_part_pages(0, 2) == 0


def test_auto_follows_the_card(monkeypatch: pytest.MonkeyPatch) -> None:
    import flashmla_backend.kv_producer as kv_producer

    monkeypatch.delenv(KV_PRODUCER_ENV, raising=False)
    monkeypatch.delenv(SHORT_PART_PAGES_ENV, raising=False)
    monkeypatch.setattr(kv_producer, "_card_prefers_cp_async", {})
    for name, expected in (("NVIDIA H100 80GB HBM3", CP_ASYNC_ALWAYS), ("NVIDIA H200", SHORT_PART_PAGES)):
        kv_producer._card_prefers_cp_async.clear()
        monkeypatch.setattr(kv_producer.torch.cuda, "get_device_name", lambda index, name=name: name)
        assert cp_async_part_pages(0, 1) == expected


def test_every_part_matches_the_kernel() -> None:
    # The API's "every part" value is the kernel's.
    match = re.search(r"constexpr\s+int\s+CP_ASYNC_ALWAYS\s*=\s*1\s*<<\s*(\d+)\s*;", assembled_source("mla_decode.cu"))
    assert match is not None and 1 << int(match.group(1)) == CP_ASYNC_ALWAYS
