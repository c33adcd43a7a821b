"""Kernel benchmark: our decode beside FlashMLA, FA3-MLA and Triton MLA, same card, same process.

    python -m flashmla_backend.bench [--out DIR] [--quick] [--no-peers] [--no-plots]
                                     [--rows TEXT] [--case memory:132,1,16,4096 ...]

Method (as in ``anchors.md``): bf16 KV cache in 64-token pages, shuffled block table, causal;
each call timed with CUDA events after an L2 flush, median of ``--iters`` calls; scheduler
metadata computed once and reused (except the "whole call" latency figure, which includes our
scheduler). GB/s and TFLOP/s use FlashMLA's formulas. Ceilings (device copy bandwidth, bf16
matmul rate) are measured in the same run. Peers come from vLLM when it is importable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import flash_mla_with_kvcache, get_mla_metadata, mla_decode_reference, precompile
from .testing import DecodeProblem, draw_lengths, make_problem

HEAD_QK, HEAD_V = 576, 512
#: GPU sleep under the host-time measurement (~50 ms at Hopper clocks): longer than the calls' host time.
HOST_TIMING_SLEEP_CYCLES = 100_000_000


@dataclass(frozen=True)
class Case:
    """One benchmark row: ``b, s_q, h_q, s_k`` (varlen: lengths uniform in [s_k/2, 3 s_k/2])."""

    regime: str
    batch: int
    s_q: int
    h_q: int
    s_k: int
    varlen: bool = False

    @property
    def label(self) -> str:
        sk = f"varlen {self.s_k}" if self.varlen else str(self.s_k)
        return f"{self.regime}: {self.batch}, {self.s_q}, {self.h_q}, {sk}"


ANCHOR_CASES = [
    Case("memory", 128, 1, 16, 4096),
    Case("memory", 128, 1, 16, 4096, True),
    Case("memory", 32, 1, 16, 32768),
    Case("memory MTP", 128, 2, 16, 8192),
    Case("mixed", 128, 1, 64, 4096),
    Case("compute", 128, 1, 128, 4096),
    Case("compute", 128, 2, 128, 4096),
    Case("compute", 128, 2, 128, 8192, True),
    Case("latency", 1, 1, 16, 8192),
    Case("latency", 8, 1, 128, 2048),
]


@dataclass
class Result:
    case: Case
    us: dict[str, float] = field(default_factory=dict)  # median µs per kernel
    rel_err: dict[str, float] = field(default_factory=dict)
    whole_call_us: float | None = None  # ours, scheduler + decode + combine, GPU time
    whole_call_host_us: float | None = None  # ours, host time of one eager whole call
    gbps: dict[str, float] = field(default_factory=dict)
    tflops: dict[str, float] = field(default_factory=dict)


def parse_case(text: str) -> Case:
    """``REGIME:B,S_Q,H_Q,S_K`` or ``REGIME:B,S_Q,H_Q,S_K,varlen`` (``--case``) as a Case."""
    regime, sep, shape = text.partition(":")
    fields = shape.split(",")
    varlen = fields[-1].strip() == "varlen"
    numbers = fields[:-1] if varlen else fields
    try:
        b, s_q, h_q, s_k = (int(f) for f in numbers)
    except ValueError:
        b = s_q = h_q = s_k = 0
    if not sep or not regime.strip() or len(numbers) != 4 or min(b, s_q, h_q, s_k) < 1:
        raise argparse.ArgumentTypeError(
            f"--case {text!r}: expected REGIME:B,S_Q,H_Q,S_K[,varlen] with positive integers, "
            "e.g. memory:132,1,16,4096")
    return Case(regime.strip(), b, s_q, h_q, s_k, varlen)


def flops_and_bytes(p: DecodeProblem) -> tuple[float, float]:
    """FlashMLA's benchmark formulas."""
    b, s_q, h_q, h_k = p.shape
    total_k = int(p.cache_seqlens.sum())
    flops = 2 * s_q * h_q * total_k * (HEAD_QK + HEAD_V)
    nbytes = 2 * (total_k * h_k * HEAD_QK + b * s_q * h_q * (HEAD_QK + HEAD_V))
    return float(flops), float(nbytes)


class Timer:
    """CUDA-event timing after an L2 flush. A GPU sleep after the flush keeps the CPU ahead of
    the GPU, so each interval is GPU time even for a call whose host cost (Python, launches)
    approaches the flush's duration; ``host_us`` measures that host cost separately."""

    def __init__(self, iters: int, warmup: int = 5, flush_bytes: int = 1 << 30,
                 headroom_cycles: int = 200_000) -> None:
        self.iters, self.warmup, self.headroom_cycles = iters, warmup, headroom_cycles
        self.flush = torch.empty(flush_bytes // 4, dtype=torch.float32, device="cuda")

    def median_us(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        for s, e in zip(starts, ends):
            self.flush.zero_()
            torch.cuda._sleep(self.headroom_cycles)
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return 1000.0 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def host_us(fn: Callable[[], object], calls: int = 50, warmup: int = 5) -> float:
    """Host µs per call of ``fn``: ``calls`` back-to-back calls enqueued while the GPU sleeps,
    so that none waits on the GPU: what an eager (no CUDA graph) caller pays on the CPU."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(HOST_TIMING_SLEEP_CYCLES)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def measure_ceilings(timer: Timer) -> dict[str, float]:
    """Device-to-device copy bandwidth (read + write) and 8192^3 bf16 matmul rate."""
    src = torch.randn(256 * 1024 * 1024, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    copy_us = timer.median_us(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_us = timer.median_us(lambda: a @ bm)
    return {"copy_GBps": 2 * 4 * 256 * 1024 * 1024 / copy_us / 1e3,
            "matmul_TFLOPs": 2 * 8192**3 / mm_us / 1e6}


# ---------------------------------------------------------------------------------------------
# Peers (vLLM 0.26 bundle)
def load_peers() -> dict[str, Callable[[DecodeProblem, float], Callable[[], torch.Tensor]]]:
    """Factories ``make(problem, scale) -> call()`` for each importable peer; each ``call``
    returns ``out [b, s_q, h_q, 512]``."""
    peers: dict[str, Callable] = {}
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        print(f"# vLLM not importable ({type(exc).__name__}: {exc}); peers skipped", file=sys.stderr)
        return peers

    try:
        from vllm.third_party.flashmla import flash_mla_interface as fm

        def make_flashmla(p: DecodeProblem, scale: float) -> Callable[[], torch.Tensor]:
            meta, _ = fm.get_mla_metadata()

            def call() -> torch.Tensor:
                out, _ = fm.flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, HEAD_V,
                                                   meta, None, softmax_scale=scale, causal=p.causal)
                return out
            return call
        peers["FlashMLA"] = make_flashmla
    except Exception as exc:  # pragma: no cover
        print(f"# FlashMLA unavailable: {exc}", file=sys.stderr)

    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

        def make_fa3(p: DecodeProblem, scale: float) -> Callable[[], torch.Tensor]:
            b, s_q, h_q, _ = p.shape
            q_pe = p.q[..., HEAD_V:].reshape(b * s_q, h_q, HEAD_QK - HEAD_V)
            q_nope = p.q[..., :HEAD_V].reshape(b * s_q, h_q, HEAD_V)
            k_pe = p.k_cache[..., HEAD_V:]
            v = p.k_cache[..., :HEAD_V]
            cu_q = torch.arange(0, b + 1, dtype=torch.int32, device="cuda") * s_q
            max_k = int(p.cache_seqlens.max())
            sched = get_scheduler_metadata(
                batch_size=b, max_seqlen_q=s_q, max_seqlen_k=max_k, num_heads_q=h_q, num_heads_kv=1,
                headdim=HEAD_QK - HEAD_V, cache_seqlens=p.cache_seqlens, qkv_dtype=p.q.dtype,
                headdim_v=HEAD_V, page_size=64, cu_seqlens_q=cu_q, causal=p.causal, num_splits=0)

            def call() -> torch.Tensor:
                out = flash_attn_varlen_func(
                    q=q_pe, k=k_pe, v=v, q_v=q_nope, max_seqlen_q=s_q, cu_seqlens_q=cu_q,
                    max_seqlen_k=max_k, seqused_k=p.cache_seqlens, block_table=p.block_table,
                    softmax_scale=scale, causal=p.causal, fa_version=3, scheduler_metadata=sched,
                    num_splits=0)
                return out.reshape(b, s_q, h_q, HEAD_V)
            return call
        peers["FA3-MLA"] = make_fa3
    except Exception as exc:  # pragma: no cover
        print(f"# FA3-MLA unavailable: {exc}", file=sys.stderr)

    try:
        from vllm.v1.attention.backends.mla.triton_mla import _compute_num_kv_splits
        from vllm.v1.attention.ops.triton_decode_attention import decode_attention_fwd

        def make_triton(p: DecodeProblem, scale: float) -> Callable[[], torch.Tensor] | None:
            b, s_q, h_q, _ = p.shape
            if s_q != 1:
                return None  # single-token decode only
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            splits = _compute_num_kv_splits(int(p.cache_seqlens.max()), sms)
            q = p.q[:, 0].contiguous()
            o = torch.zeros(b, h_q, HEAD_V, dtype=p.q.dtype, device="cuda")
            lse = torch.zeros(b, h_q, dtype=p.q.dtype, device="cuda")
            logits = torch.empty(b, h_q, splits, HEAD_V + 1, dtype=torch.float32, device="cuda")
            v = p.k_cache[..., :HEAD_V]

            def call() -> torch.Tensor:
                decode_attention_fwd(q, p.k_cache, v, o, lse, p.block_table, p.cache_seqlens, logits,
                                     splits, scale, 64, is_mla=True)
                return o.reshape(b, 1, h_q, HEAD_V)
            return call
        peers["Triton MLA"] = make_triton
    except Exception as exc:  # pragma: no cover
        print(f"# Triton MLA unavailable: {exc}", file=sys.stderr)
    return peers


# ---------------------------------------------------------------------------------------------
def build_problem(case: Case, seed: int = 0) -> DecodeProblem:
    gen = torch.Generator().manual_seed(seed)
    lengths = draw_lengths(case.batch, case.s_k, case.varlen, gen)
    return make_problem(lengths, case.s_q, case.h_q, 1, torch.bfloat16, causal=True, seed=seed, poison=False)


def run_case(case: Case, timer: Timer, peers: dict, check: bool) -> Result:
    p = build_problem(case)
    b, s_q, h_q, h_k = p.shape
    scale = HEAD_QK ** -0.5
    res = Result(case)
    md, ns = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "ours": lambda: flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, HEAD_V,
                                               md, ns, softmax_scale=scale, causal=True)[0]}
    for name, make in peers.items():
        try:
            call = make(p, scale)
        except Exception as exc:  # a peer that rejects a shape is reported, not fatal
            print(f"# {name} failed to set up {case.label}: {exc}", file=sys.stderr)
            continue
        if call is not None:
            calls[name] = call
    ref = None
    if check:
        ref, _ = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, HEAD_V, scale, True)
        ref = ref.double()
    flops, nbytes = flops_and_bytes(p)
    for name, call in calls.items():
        try:
            out = call()
            if ref is not None:
                torch.cuda.synchronize()
                res.rel_err[name] = ((out.double() - ref).norm() / ref.norm()).item()
            us = timer.median_us(call)
        except Exception as exc:
            print(f"# {name} failed on {case.label}: {exc}", file=sys.stderr)
            continue
        res.us[name] = us
        res.gbps[name] = nbytes / us / 1e3
        res.tflops[name] = flops / us / 1e6

    def whole_call() -> None:
        m, n = get_mla_metadata(p.cache_seqlens, s_q * h_q // h_k, h_k)
        flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, HEAD_V, m, n,
                               softmax_scale=scale, causal=True)
    res.whole_call_us = timer.median_us(whole_call)
    res.whole_call_host_us = host_us(whole_call, warmup=timer.warmup)
    return res


def format_table(results: list[Result], ceilings: dict[str, float], card: str) -> str:
    names = ["ours"] + sorted({n for r in results for n in r.us if n != "ours"})
    lines = [f"## {card}: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 matmul {ceilings['matmul_TFLOPs']:.0f} TFLOP/s",
             "| case (b, s_q, h_q, s_k) | " + " | ".join(names) + " | ours / best peer | ours % of ceiling |",
             "|---" * (len(names) + 3) + "|"]
    for r in results:
        cells = []
        for n in names:
            if n not in r.us:
                cells.append("n/a")
                continue
            mem_bound = r.case.regime.startswith("memory") or r.case.regime == "latency"
            rate = f"{r.gbps[n]:.0f} GB/s" if mem_bound else f"{r.tflops[n]:.0f} TF"
            cells.append(f"{r.us[n]:.1f} µs · {rate}")
        peer_times = [t for n, t in r.us.items() if n != "ours"]
        speedup = f"{min(peer_times) / r.us['ours']:.2f}x" if peer_times and "ours" in r.us else "n/a"
        if "ours" in r.us:
            if r.case.regime.startswith("compute") or r.case.regime == "mixed":
                pct = f"{100 * r.tflops['ours'] / ceilings['matmul_TFLOPs']:.0f}% matmul"
            else:
                pct = f"{100 * r.gbps['ours'] / ceilings['copy_GBps']:.0f}% copy"
        else:
            pct = "n/a"
        lines.append(f"| {r.case.label} | " + " | ".join(cells) + f" | {speedup} | {pct} |")
    lines.append("")
    lines.append("Whole call with our scheduler (GPU µs; host µs per eager call): " + ", ".join(
        f"{r.case.label.split(': ')[1]} → {r.whole_call_us:.1f}; {r.whole_call_host_us or float('nan'):.1f}"
        for r in results if r.case.regime == "latency"))
    errs = {n: max(r.rel_err.get(n, 0.0) for r in results) for n in names}
    lines.append("Max relative error vs float32 reference: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    return "\n".join(lines)


def sweep_cases(quick: bool) -> tuple[list[Case], list[Case]]:
    """(GB/s against s_k at h_q = 16, TFLOP/s against h_q x s_q) for the plots."""
    sks = [1024, 4096, 16384] if quick else [512, 1024, 2048, 4096, 8192, 16384, 32768]
    mem = [Case("memory", max(8, 128 * 4096 // max(sk, 4096)), 1, 16, sk) for sk in sks]
    comp = [Case("compute", 128, s_q, h, 4096) for s_q in (1, 2) for h in (16, 32, 64, 128)]
    return mem, comp


def plot(mem: list[Result], comp: list[Result], path: Path, card: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = sorted({n for r in mem + comp for n in r.us}, key=lambda n: (n != "ours", n))
    for n in names:
        xs = [r.case.s_k for r in mem if n in r.gbps]
        ax1.plot(xs, [r.gbps[n] for r in mem if n in r.gbps], marker="o", label=n)
        pts = sorted((r.case.h_q * r.case.s_q, r.tflops[n]) for r in comp if n in r.tflops)
        ax2.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=n)
    ax1.set(xscale="log", xlabel="s_k (h_q = 16, s_q = 1)", ylabel="GB/s", title=f"Memory-bound decode, {card}")
    ax2.set(xscale="log", xlabel="h_q x s_q (b = 128, s_k = 4096)", ylabel="TFLOP/s",
            title=f"Compute-bound decode, {card}")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for JSON and PNG")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="fewer sweep points")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the reference check of each row")
    ap.add_argument("--rows", default="",
                    help="only rows whose label contains this text (several texts: separated by '|')")
    ap.add_argument("--case", type=parse_case, action="append", default=[],
                    metavar="REGIME:B,S_Q,H_Q,S_K[,varlen]",
                    help="an extra row after the anchor rows (repeatable), e.g. memory:132,1,16,4096")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("flashmla_backend.bench: no CUDA GPU here; the benchmark runs on an H100/H200.")
        return 0
    precompile()
    card = torch.cuda.get_device_name()
    timer = Timer(args.iters)
    ceilings = measure_ceilings(timer)
    peers = {} if args.no_peers else load_peers()
    cases = [c for c in ANCHOR_CASES if any(text in c.label for text in args.rows.split("|"))] + args.case
    results = [run_case(c, timer, peers, not args.no_check) for c in cases]
    table = format_table(results, ceilings, card)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"card": card, "ceilings": ceilings, "rows": [asdict(r) for r in results]}
    if not args.no_plots:
        mem_cases, comp_cases = sweep_cases(args.quick)
        mem = [run_case(c, timer, peers, False) for c in mem_cases]
        comp = [run_case(c, timer, peers, False) for c in comp_cases]
        payload["sweep_memory"] = [asdict(r) for r in mem]
        payload["sweep_compute"] = [asdict(r) for r in comp]
        plot(mem, comp, args.out / "bench.png", card)
    (args.out / "bench.json").write_text(json.dumps(payload, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
