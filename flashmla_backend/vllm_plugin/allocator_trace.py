"""A trace of torch's CUDA caching allocator inside a vLLM process, for the serving soak.

The soak reads the GPU's used memory from outside the server, which cannot tell a leak (live
tensors that are never freed) from the caching allocator reserving one more segment the first
time a batch needs more scratch than any before it (a high-water step, freed to the cache and
reused after). Set ``FLASHMLA_BACKEND_ALLOCATOR_TRACE`` to a folder and each vLLM process that
has initialized CUDA writes ``allocator_<pid>.jsonl`` there: one JSON line per sample whose
figures changed, every :data:`PERIOD_S` seconds, with

- ``t``: wall-clock time (``time.time()``, so that another process can align it);
- ``allocated_mib`` / ``reserved_mib``: torch's live tensors and its reserved segments, summed
  over the process's devices (``torch.cuda.memory_stats``, host-side counters only: the
  sampling thread makes no CUDA call, so it cannot disturb a graph capture);
- ``segments``, ``device_allocs``: the reserved segments and ``cudaMalloc`` calls so far;
- ``step``, ``steps_seen``: the last batch this backend's metadata builder saw before the
  sample, and how many it has seen, when it runs in this process (``None`` and 0 for another
  backend).

Where this backend's builder runs, it also reads the reserved bytes at every step and writes an
``"event": "reserved_changed"`` line (``reserved_mib``, ``change_mib``, ``during_step``) when
they moved since the step before: the batch that ran in between is the one that reserved.

Started by the plugin's ``register()`` in every vLLM process, or by the metadata builder's first
step; a process forked from a traced one starts its own (threads do not survive a fork). Off (no
thread) when unset.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ALLOCATOR_TRACE_ENV = "FLASHMLA_BACKEND_ALLOCATOR_TRACE"
#: Seconds between samples; the soak's own sampler of the used memory runs at the same rate.
PERIOD_S = 0.25
_MIB = 2**20


def torch_allocator_stats() -> dict[str, float] | None:
    """This process's caching-allocator counters summed over its devices, or None before CUDA
    is initialized (sampling must not initialize it)."""
    import torch

    if not torch.cuda.is_initialized():
        return None
    totals = {"allocated_mib": 0.0, "reserved_mib": 0.0, "segments": 0.0, "device_allocs": 0.0}
    for index in range(torch.cuda.device_count()):
        stats = torch.cuda.memory_stats(index)
        totals["allocated_mib"] += stats.get("allocated_bytes.all.current", 0) / _MIB
        totals["reserved_mib"] += stats.get("reserved_bytes.all.current", 0) / _MIB
        totals["segments"] += stats.get("segment.all.current", 0)
        totals["device_allocs"] += stats.get("num_device_alloc", 0)
    return totals


class AllocatorTrace:
    """Samples ``stats()`` on a daemon thread and appends the changed samples to ``path``.

    ``note_step`` records the batch of the current step (called by the metadata builder); the
    next written sample carries it and the count of steps so far. That batch is the last one
    before the sample, not necessarily the one that moved the counters: in run 31 (H100), 80
    steps ran between the two samples around a 172 MiB step of ``reserved_mib``. Given the
    reserved bytes at each step, ``note_step`` names the batch itself (a ``reserved_changed``
    event).
    """

    def __init__(self, path: Path, stats: Callable[[], dict[str, float] | None] = torch_allocator_stats,
                 period_s: float = PERIOD_S) -> None:
        self.path = path
        self.stats = stats
        self.period_s = period_s
        self.pid = os.getpid()
        self.step: dict[str, int] | None = None
        self.steps_seen = 0
        self._last: tuple[float, ...] | None = None
        self._reserved_at_step: float | None = None
        self._write_lock = threading.Lock()  # the sampling thread and the builder both write
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flashmla-allocator-trace", daemon=True)

    def start(self) -> AllocatorTrace:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def note_step(self, reserved_mib: float | None = None, **batch: int) -> None:
        """Records the step's batch (``num_reqs``, ``num_tokens``, ``num_decodes``, ...); with
        ``reserved_mib`` (torch's reserved bytes now, in MiB), writes a ``reserved_changed``
        event naming the previous step's batch when they moved since the previous step."""
        if reserved_mib is not None:
            before = self._reserved_at_step
            if before is not None and round(reserved_mib, 1) != round(before, 1):
                self._write({"t": round(time.time(), 3), "event": "reserved_changed",
                             "reserved_mib": round(reserved_mib, 1),
                             "change_mib": round(reserved_mib - before, 1), "during_step": self.step})
            self._reserved_at_step = reserved_mib
        self.step = batch
        self.steps_seen += 1

    def _write(self, line: dict[str, Any]) -> None:
        with self._write_lock, self.path.open("a") as stream:
            stream.write(json.dumps(line) + "\n")

    def sample(self) -> bool:
        """Takes one sample; writes it when its figures differ from the last written. Returns
        whether a line was written."""
        figures = self.stats()
        if figures is None:
            return False
        key = tuple(round(value, 1) for value in figures.values())
        if key == self._last:
            return False
        self._last = key
        self._write({"t": round(time.time(), 3), **{k: round(v, 1) for k, v in figures.items()},
                     "steps_seen": self.steps_seen, "step": self.step})
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.sample()
            except Exception as exc:  # a diagnostic must never take the server down
                self._write({"t": round(time.time(), 3), "error": repr(exc)})
                return


_trace: AllocatorTrace | None = None
_lock = threading.Lock()


def start_from_env() -> AllocatorTrace | None:
    """This process's trace, started on first use when ``FLASHMLA_BACKEND_ALLOCATOR_TRACE``
    names a folder; None when the variable is unset or empty. Raises ``ValueError`` naming the
    variable when the folder cannot be created."""
    global _trace
    folder = os.environ.get(ALLOCATOR_TRACE_ENV, "")
    if not folder:
        return None
    pid = os.getpid()
    if _trace is None or _trace.pid != pid:  # a forked child inherits the parent's, threadless
        with _lock:
            if _trace is None or _trace.pid != pid:
                try:
                    Path(folder).mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ValueError(f"{ALLOCATOR_TRACE_ENV}: cannot create the trace folder "
                                     f"{folder!r} ({exc.strerror})") from exc
                _trace = AllocatorTrace(Path(folder) / f"allocator_{pid}.jsonl").start()
    return _trace


current = start_from_env


def is_sample(line: dict[str, Any]) -> bool:
    """Whether a trace line is a sample of the counters (not an error or an event line)."""
    return "error" not in line and "event" not in line


def read_trace(folder: Path) -> list[list[dict[str, Any]]]:
    """Every process's samples in ``folder``, one list per file, each in time order (error
    lines included)."""
    traces = []
    for file in sorted(Path(folder).glob("allocator_*.jsonl")):
        lines = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        traces.append(sorted(lines, key=lambda line: line["t"]))
    return traces


def state_at(traces: list[list[dict[str, Any]]], t: float) -> dict[str, float] | None:
    """The summed ``allocated_mib`` and ``reserved_mib`` of every traced process at wall time
    ``t`` (each process's last sample at or before ``t``); None when no process had a sample."""
    total = {"allocated_mib": 0.0, "reserved_mib": 0.0}
    found = False
    for samples in traces:
        before = [s for s in samples if s["t"] <= t and is_sample(s)]
        if before:
            found = True
            total["allocated_mib"] += before[-1]["allocated_mib"]
            total["reserved_mib"] += before[-1]["reserved_mib"]
    return total if found else None


def growth_between(trace_folder: Path, wall_after_warmup: float, wall_after_soak: float,
                   used_growth_mib: float) -> dict[str, Any]:
    """Splits ``used_growth_mib``, the GPU's used-memory growth between two idle readings at
    wall times ``wall_after_warmup`` and ``wall_after_soak``, by the trace in ``trace_folder``:
    torch's live tensors (``live_tensor_growth_mib``), its reserved segments
    (``cache_growth_mib``) and the rest (``growth_outside_torch_mib``). Lists each change of
    the reserved segments in between: by sample, with the last batch seen
    (``reserved_steps``), and by step, with the batch that ran
    (``reserved_changes_by_step``). ``traced`` is False when no process had a sample at both
    times."""
    traces = read_trace(trace_folder) if trace_folder.exists() else []
    before, after = state_at(traces, wall_after_warmup), state_at(traces, wall_after_soak)
    errors = [line["error"] for samples in traces for line in samples if "error" in line]
    if before is None or after is None:
        return {"traced": False, "processes": len(traces), "errors": errors}
    reserved_growth = after["reserved_mib"] - before["reserved_mib"]
    steps = []
    for samples in traces:
        last = None
        for line in samples:
            if not is_sample(line):
                continue
            if last is not None and line["reserved_mib"] != last["reserved_mib"] and \
                    wall_after_warmup < line["t"] <= wall_after_soak:
                steps.append({"t_after_warmup_s": round(line["t"] - wall_after_warmup, 2),
                              "reserved_mib": line["reserved_mib"],
                              "step_mib": round(line["reserved_mib"] - last["reserved_mib"], 1),
                              "segments": line.get("segments"), "batch": line.get("step")})
            last = line
    events = [{"t_after_warmup_s": round(line["t"] - wall_after_warmup, 2),
               **{k: v for k, v in line.items() if k not in ("t", "event")}}
              for samples in traces for line in samples
              if line.get("event") == "reserved_changed" and wall_after_warmup < line["t"] <= wall_after_soak]
    return {"traced": True, "processes": len(traces), "errors": errors,
            "after_warmup": before, "after_soak": after,
            "live_tensor_growth_mib": round(after["allocated_mib"] - before["allocated_mib"], 1),
            "cache_growth_mib": round(reserved_growth, 1),
            "growth_outside_torch_mib": round(used_growth_mib - reserved_growth, 1),
            "reserved_steps": steps[:20], "reserved_changes_by_step": events[:20]}
