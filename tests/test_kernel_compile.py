"""Every kernel compiles for sm_90a with NVRTC on a machine without a GPU, and the SASS holds
the Hopper instructions the design relies on. The Python mirror of the kernel constants agrees
with the CUDA sources."""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

import pytest

from flashmla_backend import _constants as C
from flashmla_backend.kernel_sources import (KernelModule, all_modules, assembled_source, combine_module,
                                             decode_launch_defines, decode_module)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("cuda.bindings") is None,
                                reason="cuda-bindings (NVRTC wheel) not installed: pip install -e .[test]")


@lru_cache(maxsize=None)
def compiled(module: KernelModule) -> tuple[bytes, str]:
    from flashmla_backend.offline_compile import compile_to_cubin

    return compile_to_cubin(module)


@lru_cache(maxsize=None)
def sass(module: KernelModule) -> str:
    from flashmla_backend.offline_compile import disassemble, find_nvdisasm

    if find_nvdisasm() is None:
        pytest.skip("nvdisasm not installed: pip install nvidia-cuda-nvdisasm")
    return disassemble(compiled(module)[0])


@pytest.mark.parametrize("module", all_modules(), ids=lambda m: f"{m.source_file}-{str(m.dtype)[6:]}")
def test_compiles_for_sm90a_without_warnings(module: KernelModule) -> None:
    cubin, log = compiled(module)
    assert cubin[:4] == b"\x7fELF"
    assert "warning" not in log.lower(), log
    # C7512 etc.: ptxas reports serialized wgmma or ignored setmaxnreg as "Potential Performance Loss".
    assert "Performance Loss" not in log, log


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_decode_sass_uses_hopper_instructions(dtype_name: str) -> None:
    import torch

    text = sass(decode_module(getattr(torch, dtype_name)))
    assert "HGMMA.64x64x16.F32" in text, "S = Q K^T should be a 64x64 wgmma"
    assert "HGMMA.64x256x16.F32" in text, "O += P V should be a 64x256 wgmma"
    # Warpgroup 0's half of P V takes P from registers (v10): A operand a register, not gdesc.
    assert re.search(r"HGMMA\.64x256x16\.F32(\.\w+)? R\d+, R\d+, gdesc", text), "P V with A from registers expected"
    # The Q block arrives by cp.async with every load in flight (v9), not load-then-store
    # through registers (one memory round trip per vector).
    assert "LDGSTS" in text, "Q block by cp.async expected"
    assert not re.search(r"\bLDG\.E\.128", text), "16-byte global loads through registers (the pre-v9 Q loop)"
    assert "UTMALDG.4D" in text, "pages should arrive by TMA"
    assert "SYNCS" in text, "mbarrier waits/arrives expected"
    assert "USETMAXREG" in text, "setmaxnreg should rebalance registers across warpgroups"
    assert not re.search(r"\b(LDL|STL)\b", text), "register spills to local memory"


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_softmax_kept_max_path_keeps_p_in_place(dtype_name: str) -> None:
    # v28: the page's try against the kept max ends in one warp vote. When the compiler put P
    # somewhere else than the page-max path does, it copied 32 registers after that vote on every
    # page, which cost 3% on the compute rows of an H200 (NOTES.md "v28").
    import torch

    lines = sass(decode_module(getattr(torch, dtype_name))).splitlines()
    votes = [i for i, line in enumerate(lines) if "VOTE.ANY" in line]
    assert len(votes) == 1, f"one warp vote expected in the softmax, found {len(votes)}"
    after_vote = lines[votes[0]:votes[0] + 48]
    copies = [line for line in after_vote if re.search(r"\b(IMAD\.MOV\.U32 R\d+, RZ, RZ, R\d+|MOV R\d+, R\d+)\b", line)]
    assert len(copies) < 8, f"{len(copies)} register copies after the kept-max vote:\n" + "\n".join(copies)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_output_and_partial_stores_are_16_bytes_a_lane(dtype_name: str) -> None:
    # v34: O and the float32 partials leave by quad exchange, 16 bytes a lane. Narrower stores
    # (8 bytes of a partial or 4 of the output a lane, the accumulator layout as is) took the
    # b = 8 epilogue from 2.4 back to 3.1 us on an H200 (NOTES.md "v34"); only the LSEs are 4-byte.
    import torch

    text = sass(decode_module(getattr(torch, dtype_name)))
    widths = re.findall(r"\bSTG\.E(\.\w+)?", text)
    wide = sum(1 for w in widths if w == ".128")
    narrow = [w for w in widths if w not in (".128", "")]
    assert wide >= 64, f"{wide} 16-byte stores: the quad-exchanged O / partial stores are missing"
    assert not narrow, f"narrow global stores in the decode: {narrow}"
    assert widths.count("") <= 4, f"{widths.count('')} 4-byte stores (the LSE writes are 4)"


def instructions(text: str) -> list[str]:
    """The SASS instructions of ``text`` without their addresses and encodings."""
    return [line.split("*/", 1)[-1].strip() for line in text.splitlines() if "*/" in line]


def shipped_decode_with(*defines: str) -> tuple[KernelModule, KernelModule]:
    """(the shipped bf16 decode, the same with extra -D knobs), the latter compiled without warnings."""
    import torch

    base = decode_module(torch.bfloat16)
    knob = KernelModule(base.source_file, base.entry_points, base.dtype, base.extra_defines + defines)
    log = compiled(knob)[1]
    assert "warning" not in log.lower(), log
    return base, knob


def test_descriptors_by_offset_cut_the_uniform_work_and_spill_nothing() -> None:
    # v29 knob (off until it is timed on a GPU): operand descriptors advanced by one add from a
    # base instead of rebuilt per wgmma. Same HGMMAs, far fewer uniform-datapath instructions.
    base, knob = shipped_decode_with("-DWGMMA_DESC_BY_OFFSET=1")
    shipped_text, knob_text = sass(base), sass(knob)
    uniform = lambda text: len(re.findall(r"\bU(LOP3|IADD3|SHF|MOV)\b", text))
    assert knob_text.count("HGMMA") == shipped_text.count("HGMMA")
    assert uniform(knob_text) < 0.6 * uniform(shipped_text), (uniform(knob_text), uniform(shipped_text))
    assert not re.search(r"\b(LDL|STL)\b", knob_text), "register spills to local memory"


def test_padding_warps_knob_is_shipped_and_spills_nothing() -> None:
    # v40 (on since run 33): warpgroup 0's warps with only padding rows skip the softmax. The
    # shipped SASS is the knob's; off, the softmax runs in every warp; the same HGMMAs, no spill.
    base, on = shipped_decode_with("-DSKIP_PADDING_WARPS=1")
    _, off = shipped_decode_with("-DSKIP_PADDING_WARPS=0")
    shipped_text, off_text = sass(base), sass(off)
    assert instructions(sass(on)) == instructions(shipped_text)
    assert off_text.count("HGMMA") == shipped_text.count("HGMMA")
    assert instructions(off_text) != instructions(shipped_text), "the knob changed nothing"
    assert not re.search(r"\b(LDL|STL)\b", shipped_text), "register spills to local memory"


def test_idle_combine_ctas_exit_before_the_dependency_wait() -> None:
    # Combine (IDLE_CTAS_SKIP_WAIT, on since run 33): CTAs with no split request exit before the
    # dependency wait (ACQBULK), CTA (0, 0) excepted: a CTA-wide vote (BAR.RED.OR) and an exit
    # come before the wait. Off, or with the ranges read after the wait, no CTA exits before it.
    import torch

    from flashmla_backend.kernel_sources import combine_module

    base = combine_module(torch.bfloat16, True)
    with_knobs = lambda *knobs: KernelModule(base.source_file, base.entry_points, base.dtype,
                                             base.extra_defines + knobs)
    shipped_text = sass(base)
    assert instructions(sass(with_knobs("-DIDLE_CTAS_SKIP_WAIT=1"))) == instructions(shipped_text)
    before_wait = shipped_text[:shipped_text.index("ACQBULK")]
    assert "BAR.RED.OR" in before_wait and "EXIT" in before_wait, "idle CTAs should vote and exit before the wait"
    for knobs in (("-DIDLE_CTAS_SKIP_WAIT=0",), ("-DSPLITS_BEFORE_WAIT=0",)):
        text = sass(with_knobs(*knobs))
        assert "warning" not in compiled(with_knobs(*knobs))[1].lower()
        assert "EXIT" not in text[:text.index("ACQBULK")], f"{knobs}: a CTA exits before the wait"
    assert not re.search(r"\b(LDL|STL)\b", shipped_text), "register spills to local memory"


def test_descriptor_advance_equals_rebuilding_over_the_whole_smem_window() -> None:
    # desc_advance(desc(a), b) == desc(a + b) for 16-byte aligned a, b inside the launch's shared
    # memory: the 14-bit start field never carries into the fields above it (ptx_helpers.cuh).
    def make_smem_desc(addr: int, leading: int, stride: int) -> int:
        return ((addr & 0x3FFFF) >> 4) | (((leading & 0x3FFFF) >> 4) << 16) | (((stride & 0x3FFFF) >> 4) << 32) | (1 << 62)

    window = C.DECODE_SMEM_BYTES + 1024  # the dynamic window, and room for a reserved base offset
    assert window < 1 << 18
    for leading in (16, 8192):
        for base in range(0, window, 1024):
            for offset in range(0, window - base, 16 * 37):
                assert make_smem_desc(base, leading, 1024) + (offset >> 4) == make_smem_desc(base + offset, leading, 1024)


ARCHIVED_DECODE_VERSIONS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_versions").glob("mla_decode_*.cu"))


@pytest.mark.parametrize("path", ARCHIVED_DECODE_VERSIONS, ids=lambda p: p.stem)
def test_archived_decode_versions_still_compile(path: Path) -> None:
    """The A/B harness swaps these in (FLASHMLA_BACKEND_DECODE_FILE): they must keep compiling
    against the shared headers, with the decode entry point and its Hopper instructions."""
    import torch

    text = sass(KernelModule(str(path), ("mla_decode",), torch.bfloat16, decode_launch_defines()))
    # Pages arrive by TMA, or by cp.async in the versions that take the cache pointer.
    assert "mla_decode" in text and ("UTMALDG.4D" in text or "LDGSTS" in text)
    # Diagnostics (the memory pipeline without the math) have no wgmma; decode versions must.
    assert "HGMMA" in text or path.stem.startswith("mla_decode_diag_")



@pytest.mark.parametrize("knobs", [("-DDIAG_STAGES=3",), ("-DDIAG_HOLD_NS=1500",),
                                   ("-DDIAG_STAGES=3", "-DDIAG_HOLD_NS=1500"), ("-DDIAG_CP_ASYNC=1",),
                                   ("-DDIAG_CP_ASYNC=1", "-DDIAG_STAGES=3"),
                                   ("-DDIAG_CP_ASYNC=1", "-DDIAG_STAGES=3", "-DDIAG_HOLD_NS=2300"),
                                   ("-DDIAG_CP_ASYNC=1", "-DDIAG_STAGES=3", "-DDIAG_HOLD_NS=2300",
                                    "-DDIAG_HOLD_SLEEP=1"),
                                   ("-DDIAG_CP_CHUNKS=5",), ("-DDIAG_CP_CHUNKS=8",)])
def test_pipeline_diagnostic_knobs_compile_within_the_launch(knobs: tuple[str, ...]) -> None:
    """The knobs ab_session.sh passes (e.g. mla_decode_diag_pipeline_only+DIAG_STAGES=3) must
    compile within the shared memory the API reserves (the source static_asserts it)."""
    import torch

    path = ARCHIVED_DECODE_VERSIONS[0].parent / "mla_decode_diag_pipeline_only.cu"
    text = sass(KernelModule(str(path), ("mla_decode",), torch.bfloat16, decode_launch_defines() + knobs))
    if any("CP_ASYNC" in k for k in knobs):
        assert "LDGSTS" in text and "UTMALDG" not in text  # cp.async instead of TMA
    elif any("CP_CHUNKS" in k for k in knobs):
        assert "LDGSTS" in text and "UTMALDG.4D" in text  # both engines
    else:
        assert "UTMALDG.4D" in text
    if any("HOLD_NS" in k for k in knobs):
        assert "GLOBALTIMER" in text.upper()
    if any("HOLD_SLEEP" in k for k in knobs):
        assert "NANOSLEEP" in text.upper()

@pytest.mark.parametrize("kernel,knob", [("decode", "-DDEPENDENTS_AFTER_FIRST_ISSUE=0"),
                                         ("combine", "-DSPLITS_BEFORE_WAIT=0")])
def test_ab_knobs_of_the_shipped_kernels_compile_within_their_registers(kernel: str, knob: str) -> None:
    """The A/B settings device_experiments.sh sets against the shipped defaults must build: no
    warning, the launch's register budget, at most a few bytes of spill."""
    import torch

    from flashmla_backend.kernel_sources import combine_module
    from flashmla_backend.offline_compile import compile_to_cubin

    base = (decode_module if kernel == "decode" else combine_module)(torch.bfloat16, True)
    module = KernelModule(base.source_file, base.entry_points, base.dtype, base.extra_defines + tuple(knob.split()))
    _, log = compile_to_cubin(module, module.options + ("--ptxas-options=-v",))
    assert "warning" not in log.lower(), log
    assert int(re.search(r"Used (\d+) registers", log).group(1)) <= (168 if kernel == "decode" else 128), log
    assert int(re.search(r"(\d+) bytes spill stores", log).group(1)) <= 8, log


def test_small_scheduler_has_no_barrier_and_no_shared_memory() -> None:
    # The one-warp scheduler exists to keep CTA barriers and shared-memory round trips off the
    # path from the seqlens load to the metadata stores (the latency rows' first kernel).
    from flashmla_backend.kernel_sources import SCHEDULE_MODULE

    text = sass(SCHEDULE_MODULE)
    small = text[text.index(".text.mla_schedule_small:"):]
    small = small[:small.index(".text.", 1)] if ".text." in small[1:] else small
    assert re.search(r"\bSHFL\.", small), "the small scheduler scans by shuffles"
    for opcode in ("BAR", "LDS", "STS", "ATOMS"):
        assert not re.search(rf"\b{opcode}\b", small), f"{opcode} in mla_schedule_small"




def test_fp16_variant_differs_from_bf16() -> None:
    import torch

    bf16 = sass(decode_module(torch.bfloat16))
    fp16 = sass(decode_module(torch.float16))
    assert ".BF16" in bf16 and ".F16" in fp16 and bf16 != fp16


def test_wrong_arch_fails_loudly() -> None:
    import torch

    from flashmla_backend.offline_compile import OfflineCompileError, compile_to_cubin

    with pytest.raises(OfflineCompileError, match="sm_90a"):
        compile_to_cubin(decode_module(torch.bfloat16), options=("-arch=sm_80", "-std=c++17"))



def test_decode_smem_map_must_fit_the_launch() -> None:
    """Every decode source checks its shared-memory map against what the API reserves."""
    import torch

    from flashmla_backend.offline_compile import OfflineCompileError, compile_to_cubin

    module = decode_module(torch.bfloat16)
    assert f"-DMLA_LAUNCH_SMEM_BYTES={C.DECODE_SMEM_BYTES}" in module.options
    too_small = tuple(o for o in module.options if not o.startswith("-DMLA_LAUNCH_SMEM_BYTES="))
    with pytest.raises(OfflineCompileError, match="reserves less shared memory"):
        compile_to_cubin(module, options=too_small + ("-DMLA_LAUNCH_SMEM_BYTES=200000",))

def _constexpr(source: str, name: str) -> int:
    m = re.search(rf"constexpr int {name} = ([^;]+);", source)
    assert m, f"{name} not found"
    return m.group(1)


def test_python_constants_mirror_the_cuda_sources() -> None:
    common = assembled_source("mla_common.cuh")
    for name in ("HEAD_DIM_QK", "HEAD_DIM_V", "PAGE_SIZE", "BLOCK_M", "METADATA_FIELDS",
                 "MD_BEGIN_REQ", "MD_BEGIN_PAGE", "MD_END_REQ", "MD_END_PAGE", "MD_BEGIN_SPLIT"):
        assert int(_constexpr(common, name)) == getattr(C, name), name
    decode = assembled_source("mla_decode.cu")
    assert _constexpr(decode, "DECODE_THREADS") == "3 * WG_THREADS" and C.DECODE_THREADS == 384
    # The decode smem map: Q + KV stages + P + 3 row arrays + 2 x stages barriers + alignment
    # slack; the launcher passes DECODE_SMEM_BYTES, which must cover it.
    stages = int(_constexpr(decode, "KV_STAGES"))
    tile = C.PAGE_SIZE * C.HEAD_DIM_QK * 2
    needed = (1 + stages) * tile + C.PAGE_SIZE * 64 * 2 + 3 * C.BLOCK_M * 4 + 2 * stages * 8 + 1024
    assert needed <= C.DECODE_SMEM_BYTES <= 227 * 1024
    schedule = assembled_source("mla_schedule.cu")
    for name in ("SCHEDULE_THREADS", "SMALL_SCHEDULE_THREADS", "SMALL_SCHEDULE_MAX_BATCH"):
        assert int(_constexpr(schedule, name)) == getattr(C, name), name
    combine = assembled_source("mla_combine.cu")
    assert int(_constexpr(combine, "COMBINE_WARPS")) == C.COMBINE_WARPS
    assert int(_constexpr(combine, "MAX_REQUESTS_PER_CTA")) == C.COMBINE_MAX_REQUESTS_PER_CTA


def test_decode_keeps_tile_accesses_in_the_shared_window() -> None:
    # The tile base is smem_raw plus an offset, so every access through it is st.shared /
    # ld.shared; a base rounded as an integer made P and the row statistics generic 64-bit
    # stores and loads (run 20: the shared ones with stmatrix are +3-6% on the compute rows).
    import torch

    text = sass(decode_module(torch.bfloat16, True))
    assert not re.search(r"\b(?:ST|LD)\.E\b", text), "generic loads or stores through the tile base"
    assert len(re.findall(r"\bSTS\b", text)) >= 4


def test_decode_stores_p_with_four_stmatrix_per_page() -> None:
    # P goes into its page's rope chunk by four stmatrix (m8n8.x4) per thread, not sixteen
    # 4-byte stores.
    import torch

    for dtype in (torch.bfloat16, torch.float16):
        assert len(re.findall(r"\bSTSM\.16\.M88\.4\b", sass(decode_module(dtype, True)))) == 4, dtype
