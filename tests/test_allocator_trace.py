"""The plugin's allocator trace (CPU): what it writes, when, and how the soak reads it back."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from flashmla_backend.vllm_plugin import allocator_trace
from flashmla_backend.vllm_plugin.allocator_trace import AllocatorTrace, growth_between, read_trace, state_at


class FakeStats:
    """Stands in for torch's counters: returns the queued figures in turn, then the last."""

    def __init__(self, *figures: dict[str, float] | None) -> None:
        self.figures = list(figures)

    def __call__(self) -> dict[str, float] | None:
        return self.figures.pop(0) if len(self.figures) > 1 else self.figures[0]


def figures(allocated: float, reserved: float) -> dict[str, float]:
    return {"allocated_mib": allocated, "reserved_mib": reserved, "segments": 3, "device_allocs": 5}


def test_writes_only_samples_that_changed(tmp_path: Path) -> None:
    stats = FakeStats(None, figures(10, 100), figures(10, 100), figures(12, 100), figures(12, 330))
    trace = AllocatorTrace(tmp_path / "allocator_1.jsonl", stats)
    written = [trace.sample() for _ in range(5)]
    # Before CUDA is up nothing is written; a repeated sample is skipped.
    assert written == [False, True, False, True, True]
    lines = [json.loads(line) for line in (tmp_path / "allocator_1.jsonl").read_text().splitlines()]
    assert [(line["allocated_mib"], line["reserved_mib"]) for line in lines] == [(10, 100), (12, 100), (12, 330)]


def test_a_sample_carries_the_last_step(tmp_path: Path) -> None:
    trace = AllocatorTrace(tmp_path / "allocator_1.jsonl", FakeStats(figures(1, 2), figures(1, 40)))
    trace.sample()
    trace.note_step(num_reqs=64, num_tokens=8192, num_decodes=60, num_prefills=4)
    trace.sample()
    first, second = read_trace(tmp_path)[0]
    assert first["step"] is None and first["steps_seen"] == 0
    assert second["step"] == {"num_reqs": 64, "num_tokens": 8192, "num_decodes": 60, "num_prefills": 4}
    assert second["steps_seen"] == 1


def test_state_at_sums_processes_at_a_time(tmp_path: Path) -> None:
    for pid, samples in {1: [(100.0, 5, 50), (200.0, 6, 80)], 2: [(150.0, 1, 10)]}.items():
        with (tmp_path / f"allocator_{pid}.jsonl").open("w") as stream:
            for t, allocated, reserved in samples:
                stream.write(json.dumps({"t": t, "allocated_mib": allocated, "reserved_mib": reserved}) + "\n")
    traces = read_trace(tmp_path)
    assert state_at(traces, 50.0) is None
    assert state_at(traces, 120.0) == {"allocated_mib": 5, "reserved_mib": 50}
    assert state_at(traces, 150.0) == {"allocated_mib": 6, "reserved_mib": 60}
    assert state_at(traces, 999.0) == {"allocated_mib": 7, "reserved_mib": 90}


def test_the_thread_samples_until_stopped(tmp_path: Path) -> None:
    counter = iter(range(10**6))
    trace = AllocatorTrace(tmp_path / "t" / "allocator_1.jsonl",
                           lambda: figures(float(next(counter)), 1.0), period_s=0.01).start()
    time.sleep(0.2)
    trace.stop()
    count = len(read_trace(tmp_path / "t")[0])
    time.sleep(0.05)
    assert count >= 3
    assert len(read_trace(tmp_path / "t")[0]) == count


def test_a_failing_sample_is_written_and_ends_the_thread(tmp_path: Path) -> None:
    def broken() -> dict[str, float]:
        raise RuntimeError("no counters")

    trace = AllocatorTrace(tmp_path / "allocator_1.jsonl", broken, period_s=0.01).start()
    trace._thread.join(timeout=5)
    assert not trace._thread.is_alive()
    (line,) = read_trace(tmp_path)[0]
    assert "no counters" in line["error"]
    assert state_at(read_trace(tmp_path), time.time()) is None


def test_off_unless_the_variable_names_a_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(allocator_trace.ALLOCATOR_TRACE_ENV, raising=False)
    monkeypatch.setattr(allocator_trace, "_trace", None)
    assert allocator_trace.start_from_env() is None
    monkeypatch.setenv(allocator_trace.ALLOCATOR_TRACE_ENV, "")
    assert allocator_trace.start_from_env() is None
    assert allocator_trace.current() is None


def test_started_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(allocator_trace.ALLOCATOR_TRACE_ENV, str(tmp_path))
    monkeypatch.setattr(allocator_trace, "_trace", None)
    first = allocator_trace.start_from_env()
    try:
        assert first is not None and allocator_trace.start_from_env() is first
        assert first.path.parent == tmp_path and first.path.name.startswith("allocator_")
        # What a forked child sees: the parent's trace object, whose thread did not survive.
        first.pid = -1
        child = allocator_trace.start_from_env()
        assert child is not first and child.pid == os.getpid()
        child.stop()
    finally:
        first.stop()


def test_no_counters_before_cuda_is_initialized() -> None:
    import torch

    if torch.cuda.is_initialized():
        pytest.skip("CUDA is already initialized in this process")
    assert allocator_trace.torch_allocator_stats() is None
    assert not torch.cuda.is_initialized()


def write_samples(path: Path, samples: list[dict]) -> None:
    path.write_text("".join(json.dumps(sample) + "\n" for sample in samples))


def test_growth_splits_into_live_tensors_cache_and_the_rest(tmp_path: Path) -> None:
    batch = {"num_reqs": 64, "num_tokens": 4096}
    write_samples(tmp_path / "allocator_7.jsonl", [
        {"t": 10.0, "allocated_mib": 900, "reserved_mib": 1000, "segments": 4, "step": None},
        {"t": 20.0, "allocated_mib": 1150, "reserved_mib": 1230, "segments": 5, "step": batch},
        {"t": 21.0, "allocated_mib": 901, "reserved_mib": 1230, "segments": 5, "step": batch},
    ])
    # Idle readings at t = 15 and t = 30; the GPU's used memory grew by 240 MiB in between.
    growth = growth_between(tmp_path, 15.0, 30.0, used_growth_mib=240.0)
    assert growth["traced"] and growth["processes"] == 1
    assert growth["live_tensor_growth_mib"] == 1.0
    assert growth["cache_growth_mib"] == 230.0
    assert growth["growth_outside_torch_mib"] == 10.0
    (step,) = growth["reserved_steps"]
    assert step == {"t_after_warmup_s": 5.0, "reserved_mib": 1230, "step_mib": 230.0, "segments": 5,
                    "batch": batch}


def test_growth_is_untraced_without_samples_at_both_readings(tmp_path: Path) -> None:
    assert growth_between(tmp_path / "missing", 1.0, 2.0, 0.0) == {"traced": False, "processes": 0, "errors": []}
    write_samples(tmp_path / "allocator_7.jsonl", [{"t": 5.0, "allocated_mib": 1, "reserved_mib": 2}])
    assert not growth_between(tmp_path, 1.0, 9.0, 0.0)["traced"]


def test_a_step_that_reserves_is_named_by_its_batch(tmp_path: Path) -> None:
    trace = AllocatorTrace(tmp_path / "allocator_1.jsonl", FakeStats(figures(1, 100)))
    prefill = {"num_reqs": 49, "num_tokens": 8192, "num_prefills": 16}
    decode = {"num_reqs": 16, "num_tokens": 16, "num_prefills": 0}
    trace.note_step(reserved_mib=100.0, **decode)
    trace.note_step(reserved_mib=100.0, **prefill)  # unchanged since the decode step: no event
    trace.note_step(reserved_mib=272.0, **decode)  # the prefill step reserved 172 MiB
    trace.note_step(**decode)  # no reading (CPU tensors): no event, and none later
    (event,) = read_trace(tmp_path)[0]
    assert event["event"] == "reserved_changed"
    assert event["change_mib"] == 172.0 and event["during_step"] == prefill
    assert state_at(read_trace(tmp_path), event["t"] + 1) is None  # events are not samples


def test_growth_lists_the_events_inside_the_window(tmp_path: Path) -> None:
    write_samples(tmp_path / "allocator_7.jsonl", [
        {"t": 10.0, "allocated_mib": 900, "reserved_mib": 1000},
        {"t": 12.0, "event": "reserved_changed", "reserved_mib": 1050, "change_mib": 50, "during_step": {"a": 1}},
        {"t": 20.0, "event": "reserved_changed", "reserved_mib": 1230, "change_mib": 180, "during_step": {"a": 2}},
        {"t": 21.0, "allocated_mib": 900, "reserved_mib": 1230},
    ])
    growth = growth_between(tmp_path, 15.0, 30.0, used_growth_mib=180.0)
    assert growth["cache_growth_mib"] == 1230 - 1000 and growth["live_tensor_growth_mib"] == 0
    assert growth["reserved_changes_by_step"] == [
        {"t_after_warmup_s": 5.0, "reserved_mib": 1230, "change_mib": 180, "during_step": {"a": 2}}]


def test_a_folder_that_cannot_be_made_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(allocator_trace.ALLOCATOR_TRACE_ENV, str(blocker / "trace"))
    monkeypatch.setattr(allocator_trace, "_trace", None)
    with pytest.raises(ValueError, match=allocator_trace.ALLOCATOR_TRACE_ENV):
        allocator_trace.start_from_env()
    assert allocator_trace._trace is None
