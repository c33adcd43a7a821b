"""Invariants of the split-KV schedule (Python mirror of the GPU scheduler kernel)."""

from __future__ import annotations

import pytest
import torch

from flashmla_backend._constants import PAGE_SIZE
from flashmla_backend.schedule import num_m_blocks, num_sm_parts, pages_per_part, schedule_reference


def pieces(metadata: torch.Tensor, num_splits: torch.Tensor, lengths: list[int]) -> list[tuple[int, int, int, int]]:
    """(request, first page, end page, split slot) of every piece, as the decode kernel walks them."""
    pages = [-(-n // PAGE_SIZE) if n > 0 else 0 for n in lengths]
    out = []
    for begin_req, begin_page, end_req, end_page, begin_split, *_ in metadata.tolist():
        for req in range(begin_req, end_req + 1):
            first = begin_page if req == begin_req else 0
            end = end_page if req == end_req else pages[req]
            split = begin_split if req == begin_req else int(num_splits[req])
            out.append((req, first, end, split))
    return out


@pytest.mark.parametrize("lengths,parts", [
    ([4096] * 128, 132), ([0] * 7, 132), ([1], 132), ([8192], 132), ([0, 5, 100000, 64, 65], 16),
    (list(range(0, 5000, 41)), 33), ([3] * 1000, 132), ([70000, 1], 1), ([4096] * 120 + [4000] * 4, 132),
])
@pytest.mark.parametrize("slack", [0, 1, 16])
@pytest.mark.parametrize("whole", [False, True])
def test_every_page_is_covered_once(lengths: list[int], parts: int, slack: int, whole: bool) -> None:
    md, ns = schedule_reference(torch.tensor(lengths, dtype=torch.int32), parts, slack_16ths=slack, whole=whole)
    assert md.shape == (parts, 8) and ns.shape == (len(lengths) + 1,)
    got = pieces(md, ns, lengths)
    for req, n in enumerate(lengths):
        mine = sorted((first, end, split) for r, first, end, split in got if r == req)
        n_pages = -(-n // PAGE_SIZE) if n > 0 else 0
        assert mine, f"request {req} has no piece"
        assert mine[0][0] == 0 and mine[-1][1] == n_pages, f"request {req} not fully covered"
        for (_, end, _), (first, _, _) in zip(mine, mine[1:]):
            assert end == first, f"request {req}: pieces overlap or leave a gap"
        splits = [s for _, _, s in mine]
        assert splits == list(range(int(ns[req]), int(ns[req + 1]))), f"request {req}: split slots"
        if len(mine) > 1:
            assert all(end > first for first, end, _ in mine), "an empty piece in a split request"
    assert int(ns[-1]) <= len(lengths) + parts, "more splits than the workspace holds"


@pytest.mark.parametrize("lengths,parts", [
    ([8192], 132), ([60000], 132), ([2048] * 8, 66), ([3000, 0, 17, 9000, 0, 64, 4096], 132),
    (list(range(0, 5000, 41)), 33), ([70000, 1], 1), ([150] * 60 + [0, 1, 64, 20000, 9000], 132),
])
@pytest.mark.parametrize("whole", [False, True])
def test_each_split_is_one_parts_first_or_last_piece(lengths: list[int], parts: int, whole: bool) -> None:
    # The pieces in between a part's first and last cover whole requests: a split can only be a
    # part's first piece (split begin_split) or its last (split 0 of a request it starts). Every
    # split of every split request is claimed that way exactly once, or its partial is never
    # written (the combine would read a stale row).
    md, ns = schedule_reference(torch.tensor(lengths, dtype=torch.int32), parts, whole=whole)
    claimed = []
    for begin_req, _, end_req, _, begin_split, *_ in md.tolist():
        if end_req < begin_req:
            continue
        ends = [(begin_req, begin_split - int(ns[begin_req]))]
        if end_req != begin_req:
            ends.append((end_req, 0))
        claimed += [(req, split) for req, split in ends if int(ns[req + 1] - ns[req]) > 1]
    wanted = [(req, k) for req in range(len(lengths)) for k in range(int(ns[req + 1] - ns[req]))
              if int(ns[req + 1] - ns[req]) > 1]
    assert sorted(claimed) == wanted


@pytest.mark.parametrize("lengths,parts", [([8192], 132), ([4096] * 128, 132), (list(range(0, 5000, 41)), 33),
                                           ([150] * 60 + [0, 1, 64, 20000, 9000], 132)])
def test_pages_per_part_counts_each_parts_pieces(lengths: list[int], parts: int) -> None:
    # A part's pages are those of its pieces.
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    md, ns = schedule_reference(seqlens, parts)
    counted = pages_per_part(md, seqlens)
    assert len(counted) == parts
    for part in range(parts):
        assert counted[part] == sum(end - first for _, first, end, _ in pieces(md[part:part + 1], ns, lengths))
    assert sum(counted) == sum(-(-n // PAGE_SIZE) for n in lengths)


def test_part_count_fills_the_sms() -> None:
    assert num_m_blocks(16) == 1 and num_m_blocks(256) == 4
    assert num_sm_parts(132, 16, 1) == 132
    assert num_sm_parts(132, 256, 1) == 33
    assert num_sm_parts(132, 512, 2) == 8
    assert num_sm_parts(4, 512, 2) == 1


def test_part_cap_knob_removes_splits_for_an_even_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    # 128 x 4096 on 132 parts: a part boundary cuts every request (the combine merges 2 splits
    # each); capped at 128 parts, the boundaries fall between requests.
    monkeypatch.setenv("FLASHMLA_BACKEND_NO_SPLIT_SLACK", "0")
    monkeypatch.setenv("FLASHMLA_BACKEND_WHOLE_REQUESTS", "0")  # it too would keep them whole
    lengths = torch.tensor([4096] * 128, dtype=torch.int32)
    _, ns = schedule_reference(lengths, num_sm_parts(132, 16, 1))
    assert int(ns[-1]) > 128
    monkeypatch.setenv("FLASHMLA_BACKEND_MAX_SM_PARTS", "128")
    assert num_sm_parts(132, 16, 1) == 128 and num_sm_parts(132, 256, 1) == 33
    _, ns = schedule_reference(lengths, num_sm_parts(132, 16, 1))
    assert int(ns[-1]) == 128
    monkeypatch.setenv("FLASHMLA_BACKEND_MAX_SM_PARTS", "")
    assert num_sm_parts(132, 16, 1) == 132
    monkeypatch.setenv("FLASHMLA_BACKEND_MAX_SM_PARTS", "0")
    with pytest.raises(ValueError, match="FLASHMLA_BACKEND_MAX_SM_PARTS"):
        num_sm_parts(132, 16, 1)


@pytest.mark.parametrize("batch,length,unsplit", [
    (128, 4096, True),    # cost 69 against payload 67: within 1/16, one request per part
    (128, 8192, True),    # 133 against 129
    (124, 4096, True),    # 69 against 65 (6.2%)
    (120, 4096, False),   # 69 against 63 (9.5%): splitting balances better
    (32, 32768, False),   # one request spans many parts either way
])
def test_no_split_rule_keeps_near_even_batches_whole(batch: int, length: int, unsplit: bool) -> None:
    lengths = torch.tensor([length] * batch, dtype=torch.int32)
    # The slack rule alone (the whole-request rule would keep some of these whole by itself).
    _, ns = schedule_reference(lengths, 132, overhead=5, slack_16ths=1, whole=False)
    assert (int(ns[-1]) == batch) == unsplit
    _, ns_off = schedule_reference(lengths, 132, overhead=5, slack_16ths=0, whole=False)
    assert int(ns_off[-1]) > batch


def test_no_split_slack_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    from flashmla_backend.schedule import no_split_slack

    monkeypatch.setenv("FLASHMLA_BACKEND_NO_SPLIT_SLACK", "")
    assert no_split_slack() == 1
    monkeypatch.setenv("FLASHMLA_BACKEND_NO_SPLIT_SLACK", "3")
    assert no_split_slack() == 3
    for bad in ("-1", "x", "1.5", "17", "99999999999"):
        monkeypatch.setenv("FLASHMLA_BACKEND_NO_SPLIT_SLACK", bad)
        with pytest.raises(ValueError, match="FLASHMLA_BACKEND_NO_SPLIT_SLACK"):
            no_split_slack()


SHORT_VARLEN = [32 + (37 * i) % 65 for i in range(128)]  # 32-96 keys: 1 or 2 pages each


@pytest.mark.parametrize("lengths,parts,whole_applies", [
    (SHORT_VARLEN, 132, True),                     # costs 6-7 against an even share of 5
    (SHORT_VARLEN[:100] + [0] * 20, 132, True),    # empty requests get a part each too
    ([4096] * 128, 132, True),                     # 69 against 67: one per part, as before
    ([4096] * 120, 132, False),                    # 69 against 63 + 5: splitting balances better
    ([64] * 200, 132, False),                      # more requests than parts
    ([8192], 132, False),                          # one long request spans many parts
    ([2048] * 8, 66, False),                       # the b = 8 latency row
])
def test_whole_request_rule(lengths: list[int], parts: int, whole_applies: bool) -> None:
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    md, ns = schedule_reference(seqlens, parts, overhead=5, slack_16ths=1, whole=True)
    md_off, ns_off = schedule_reference(seqlens, parts, overhead=5, slack_16ths=1, whole=False)
    if not whole_applies:
        assert torch.equal(md, md_off) and torch.equal(ns, ns_off)
        return
    # Part i runs request i alone, whole; the parts past the batch are idle.
    batch = len(lengths)
    assert torch.equal(ns, torch.arange(batch + 1, dtype=torch.int32))
    assert md[:batch, 0].tolist() == list(range(batch)) and md[:batch, 2].tolist() == list(range(batch))
    assert md[:batch, 1].tolist() == [0] * batch
    assert md[:batch, 3].tolist() == [-(-n // PAGE_SIZE) for n in lengths]
    assert bool((md[batch:, 0] > md[batch:, 2]).all())
    # The costliest part (5 per piece plus its pages, the model's overhead charged where it is
    # paid) never gets dearer, and gets cheaper where the even share gave a part two requests.
    def costliest_part(metadata: torch.Tensor, num_splits: torch.Tensor) -> int:
        return max(sum(5 + end - first for _, first, end, _ in pieces(metadata[p:p + 1], num_splits, lengths))
                   for p in range(parts))

    assert costliest_part(md, ns) <= costliest_part(md_off, ns_off)
    if lengths == SHORT_VARLEN:
        assert costliest_part(md, ns) < costliest_part(md_off, ns_off)


def test_whole_request_rule_is_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from flashmla_backend.schedule import whole_requests

    seqlens = torch.tensor(SHORT_VARLEN, dtype=torch.int32)
    monkeypatch.setenv("FLASHMLA_BACKEND_WHOLE_REQUESTS", "")
    assert whole_requests()
    _, ns = schedule_reference(seqlens, 132)
    assert int(ns[-1]) == len(SHORT_VARLEN)
    monkeypatch.setenv("FLASHMLA_BACKEND_WHOLE_REQUESTS", "0")
    assert not whole_requests()
    _, ns_off = schedule_reference(seqlens, 132)
    assert int(ns_off[-1]) > len(SHORT_VARLEN)  # the even share splits some of them
