"""The rule that picks the decode's KV producer (``flashmla_backend/kv_producer.py``)."""

from __future__ import annotations

import pytest

from flashmla_backend.kv_producer import card_prefers_cp_async, kv_producer_setting, load_by_cp_async
from flashmla_backend.settings import KV_PRODUCER_ENV


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


def test_overrides_and_several_query_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Neither an override nor several query blocks needs to ask the device.
    monkeypatch.setenv(KV_PRODUCER_ENV, "tma")
    assert not load_by_cp_async(0, 1)
    monkeypatch.setenv(KV_PRODUCER_ENV, "cp_async")
    assert load_by_cp_async(0, 1) and load_by_cp_async(0, 4)
    monkeypatch.setenv(KV_PRODUCER_ENV, "auto")
    assert not load_by_cp_async(0, 2)


def test_auto_follows_the_card(monkeypatch: pytest.MonkeyPatch) -> None:
    import flashmla_backend.kv_producer as kv_producer

    monkeypatch.delenv(KV_PRODUCER_ENV, raising=False)
    monkeypatch.setattr(kv_producer, "_card_prefers_cp_async", {})
    for name, expected in (("NVIDIA H100 80GB HBM3", True), ("NVIDIA H200", False)):
        kv_producer._card_prefers_cp_async.clear()
        monkeypatch.setattr(kv_producer.torch.cuda, "get_device_name", lambda index, name=name: name)
        assert load_by_cp_async(0, 1) is expected
