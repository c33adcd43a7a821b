"""Serving soak: ``vllm serve --attention-backend CUSTOM`` under a bounded, mixed load.

One server (64 sequences at most, prefix caching on, CUDA graphs). The client (``soak_client``):
1. sends 8 greedy probe completions alone, one at a time;
2. warms up with 256 requests of the mix from 64 streams, then reads the GPU's used memory;
3. soaks with 2000 more requests from 64 streams: completions and chats, streamed or not,
   1-3000 prompt tokens, 1-64 generated, about 10% cancelled (streams closed early, plain
   requests given up by a client timeout), with each probe sent 3 more times among them;
4. reads the used memory again once the server is idle.

Passes when no request failed (cancellations are not failures), the server is alive and its
log has no error or traceback, the used memory did not grow after the warm-up (within
:data:`MEMORY_GROWTH_TOLERANCE_MIB`), and every probe answered under load as it did alone (up to
a near tie, ``soak_client.compare_probe``). The figures go to ``soak_report.json`` in the
test's folder, and to ``$FLASHMLA_SOAK_REPORT`` when set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import time
from pathlib import Path

import pytest
import torch
from soak_client import Job, compare_probe, make_jobs, make_probes, run_jobs, summarize
from vllm_harness import assert_custom_backend_used, requires_engine
from vllm_server import ServerStartError, serve

pytestmark = [
    requires_engine,
    pytest.mark.skipif(importlib.util.find_spec("openai") is None, reason="the openai client is not installed"),
]

MODEL_NAME = "tiny-deepseek"
CONCURRENCY = 64
WARMUP_REQUESTS = 256
SOAK_REQUESTS = 2000
PROBE_LENGTHS = [5, 63, 64, 130, 700, 1500, 2500, 3000]
PROBE_REPEATS = 3
#: The driver and the CUDA caching allocator work in 2 MiB pages; a leak per request would
#: show as hundreds of MiB over 2000 requests.
MEMORY_GROWTH_TOLERANCE_MIB = 8
SERVER_ARGS = ["--attention-backend", "CUSTOM", "--gpu-memory-utilization", "0.3", "--max-model-len", "4096",
               "--max-num-seqs", str(CONCURRENCY), "--seed", "0", "--enable-prefix-caching"]
#: Log lines that mean the server hit an error (request aborts are logged at INFO).
ERROR_MARKERS = ("Traceback (most recent call last)", " ERROR ", "CUDA error", "EngineDeadError")


def used_gpu_memory_mib() -> float:
    """Memory in use on GPU 0 by every process (the server's included), in MiB."""
    free, total = torch.cuda.mem_get_info(0)
    return (total - free) / 2**20


def interleave_probes(jobs: list[Job], probes: list[Job], repeats: int, seed: int) -> list[Job]:
    """``jobs`` with ``repeats`` copies of each probe at random places (never the first 64)."""
    rng = random.Random(seed)
    mixed = list(jobs)
    for _ in range(repeats):
        for probe in probes:
            mixed.insert(rng.randint(CONCURRENCY, len(mixed)), probe)
    return mixed


def test_soak_2000_requests_from_64_streams(tiny_model: Path, vllm_env: dict[str, str], tmp_path: Path,
                                            vocab_size: int) -> None:
    probes = make_probes(PROBE_LENGTHS, vocab_size, seed=7)
    warmup = make_jobs(WARMUP_REQUESTS, vocab_size, seed=1)
    soak = make_jobs(SOAK_REQUESTS, vocab_size, seed=2, first_index=WARMUP_REQUESTS)
    soak_with_probes = interleave_probes(soak, probes, PROBE_REPEATS, seed=3)
    report: dict = {"concurrency": CONCURRENCY, "server_args": SERVER_ARGS}

    memory_start = used_gpu_memory_mib()
    try:
        with serve(tiny_model, MODEL_NAME, SERVER_ARGS, vllm_env, tmp_path / "server.log") as server:
            memory_ready = used_gpu_memory_mib()
            alone = run_jobs(server.base_url, MODEL_NAME, probes, concurrency=1)

            started = time.perf_counter()
            warmup_outcomes = run_jobs(server.base_url, MODEL_NAME, warmup, CONCURRENCY)
            report["warmup"] = summarize(warmup, warmup_outcomes) | {"seconds": time.perf_counter() - started}
            time.sleep(2)
            memory_after_warmup = used_gpu_memory_mib()

            started = time.perf_counter()
            outcomes = run_jobs(server.base_url, MODEL_NAME, soak_with_probes, CONCURRENCY)
            report["soak"] = summarize(soak_with_probes, outcomes) | {"seconds": time.perf_counter() - started}
            time.sleep(2)
            memory_after_soak = used_gpu_memory_mib()
            server_alive = server.process.poll() is None
            log = server.log()
    except ServerStartError as exc:
        pytest.fail(str(exc))

    probe_problems = []
    exact = 0
    for job, outcome in zip(soak_with_probes, outcomes, strict=True):
        if job.probe is None:
            continue
        problem = compare_probe(alone[job.probe], outcome)
        exact += problem is None and alone[job.probe].tokens == outcome.tokens
        if problem is not None:
            probe_problems.append(f"probe {job.probe} ({PROBE_LENGTHS[job.probe]} tokens): {problem}")
    error_lines = [line for line in log.splitlines() if any(m in line for m in ERROR_MARKERS)]
    report.update({
        "memory_mib": {"before_server": memory_start, "server_ready": memory_ready,
                       "after_warmup": memory_after_warmup, "after_soak": memory_after_soak,
                       "growth_after_warmup": memory_after_soak - memory_after_warmup},
        "probes": {"compared": len(probes) * PROBE_REPEATS, "identical": exact, "problems": probe_problems},
        "server_alive": server_alive, "server_error_lines": error_lines[:20],
        "device": torch.cuda.get_device_name(0),
    })
    text = json.dumps(report, indent=1)
    (tmp_path / "soak_report.json").write_text(text)
    if os.environ.get("FLASHMLA_SOAK_REPORT"):
        Path(os.environ["FLASHMLA_SOAK_REPORT"]).write_text(text)
    print(text)

    assert_custom_backend_used(log)
    assert server_alive, "the server died during the soak"
    assert not error_lines, "server log has errors:\n" + "\n".join(error_lines[:20])
    for phase in ("warmup", "soak"):
        assert report[phase]["status"].get("error", 0) == 0, f"{phase} errors: {report[phase]['errors']}"
    assert report["soak"]["requests"] >= SOAK_REQUESTS
    assert report["soak"]["status"].get("cancelled", 0) >= SOAK_REQUESTS // 50, "too few cancellations happened"
    assert memory_after_soak - memory_after_warmup <= MEMORY_GROWTH_TOLERANCE_MIB, report["memory_mib"]
    assert not probe_problems, "\n".join(probe_problems)
