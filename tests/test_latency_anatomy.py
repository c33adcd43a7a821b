"""The trace arithmetic of ``benchmarks/latency_anatomy.py`` (CPU only): calls are cut at the
flush kernels, and busy time, span and idle gaps come out of the kernel timestamps."""

from __future__ import annotations

from benchmark_scripts import load_benchmark_script


anatomy = load_benchmark_script("latency_anatomy")


def kernel(name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}


FLUSH = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>"


def test_calls_are_cut_at_the_flushes_and_gaps_measured() -> None:
    events = [
        kernel("mla_decode", 0.0, 5.0),  # before the first flush: warm-up, dropped
        kernel(FLUSH, 10.0, 300.0),
        kernel("mla_decode", 320.0, 20.0), kernel("mla_combine", 345.0, 4.0),  # 5 µs gap
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 321.0, "dur": 3.0},
        kernel(FLUSH, 400.0, 300.0),
        kernel("mla_combine", 727.0, 6.0), kernel("mla_decode", 705.0, 20.0),  # out of order, 2 µs gap
    ]
    calls = anatomy.split_calls(events)
    assert [[k["name"] for k in c] for c in calls] == [["mla_decode", "mla_combine"]] * 2
    s = anatomy.summarize(calls)
    assert s["kernels"] == {"mla_decode": 20.0, "mla_combine": 5.0}
    assert s["busy_us"] == 25.0  # median of 24 and 26
    assert s["span_us"] == 28.5  # median of 29 and 28
    assert s["kernels_per_call"] == 2


def test_a_short_fill_is_a_kernel_of_the_call_not_a_flush() -> None:
    events = [kernel(FLUSH, 0.0, 300.0), kernel(FLUSH, 310.0, 2.0), kernel("mla_decode", 313.0, 10.0)]
    calls = anatomy.split_calls(events)
    assert [len(c) for c in calls] == [2]
