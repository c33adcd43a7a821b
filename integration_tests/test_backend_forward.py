"""The backend's own decode path, without an engine: ``_build_decode`` then ``forward_mqa``.

Builder and impl are created without vLLM's config plumbing (``__new__`` plus the few base
attributes the decode path reads), so these tests need vLLM importable but no model. On a CPU
the API runs its float32 reference; on a Hopper GPU the kernels run, and one test captures
``forward_mqa`` in a CUDA graph, feeds the next step through the persistent buffers, replays,
and checks the replay computed the new step.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from vllm_harness import GPU_SKIP_REASON, requires_vllm, requires_vllm_on_hopper

from flashmla_backend import mla_decode_reference
from flashmla_backend.vllm_plugin.block_table import expand_block_table, split_cache_blocks

pytestmark = requires_vllm

DEVICES = ["cpu"] + (["cuda"] if GPU_SKIP_REASON is None else [])
SCALE = 0.07


def _backend():  # imported lazily: the module imports vLLM
    from flashmla_backend.vllm_plugin import backend

    return backend


def make_builder(device: torch.device, num_heads: int, block_size: int, full_cudagraphs: bool,
                 max_query_len: int = 1, max_num_seqs: int = 16, max_capture_tokens: int = 32):
    """A metadata builder with just the state the decode path uses."""
    backend = _backend()
    builder = backend.FlashMLACompatMetadataBuilder.__new__(backend.FlashMLACompatMetadataBuilder)
    builder.device = device
    builder.num_heads = num_heads
    builder.dcp_world_size = 1
    builder.reorder_batch_threshold = max_query_len
    builder._init_decode_state(block_size, max_num_seqs, max_capture_tokens, full_cudagraphs)
    return builder


def make_impl(dcp_world_size: int = 2):
    """The impl with the attributes ``forward_mqa`` reads; by default as under decode context
    parallelism (2 ranks), the one case where it returns the LSE, so that tests can check it."""
    backend = _backend()
    impl = backend.FlashMLACompatImpl.__new__(backend.FlashMLACompatImpl)
    impl.kv_lora_rank = 512
    impl.scale = SCALE
    impl.dcp_world_size = dcp_world_size
    return impl


def make_metadata(decode, num_decodes: int):
    backend = _backend()
    metadata = backend.FlashMLACompatMetadata.__new__(backend.FlashMLACompatMetadata)
    metadata.decode = decode
    metadata.num_decodes = num_decodes
    return metadata


@dataclass
class Step:
    """One decode step as vLLM hands it over (device tensors, cache blocks of ``block_size``)."""

    q: torch.Tensor  # [b * s_q, H, 576]
    cache: torch.Tensor  # [num_blocks, block_size, 576]
    block_table: torch.Tensor  # [b, max_blocks] int32, garbage past each end
    seq_lens: torch.Tensor  # [b] int32
    query_start_loc_cpu: torch.Tensor  # [b + 1] int32

    def build(self, builder):
        return builder._build_decode(self.block_table, self.seq_lens, int(self.seq_lens.max()),
                                     self.query_start_loc_cpu, self.query_start_loc_cpu.to(self.q.device),
                                     self.q.shape[0], None)


def make_step(lengths: list[int], query_len: int, num_heads: int, block_size: int, device: torch.device,
              seed: int, num_blocks: int = 48, max_blocks: int = 12) -> Step:
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    cache = torch.randn(num_blocks, block_size, 576, generator=generator).to(torch.bfloat16)
    table = torch.randint(0, 2 ** 20, (batch, max_blocks), generator=generator, dtype=torch.int32)
    ids = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    used = 0
    for row, length in enumerate(lengths):
        n = -(-length // block_size)
        table[row, :n] = ids[used:used + n]
        used += n
    q = torch.randn(batch * query_len, num_heads, 576, generator=generator).to(torch.bfloat16)
    qsl = torch.arange(batch + 1, dtype=torch.int32) * query_len
    return Step(q.to(device), cache.to(device), table.to(device),
                torch.tensor(lengths, dtype=torch.int32, device=device), qsl)


def reference(step: Step, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 reference in vLLM's layout: ``out [T, H, 512]``, ``lse [T, H]``."""
    batch = step.seq_lens.shape[0]
    tokens, heads, _ = step.q.shape
    q = step.q.cpu().view(batch, tokens // batch, heads, 576)
    pages = split_cache_blocks(step.cache.cpu()).unsqueeze(-2)
    table = expand_block_table(step.block_table.cpu(), block_size // 64)
    out, lse = mla_decode_reference(q, pages, table, step.seq_lens.cpu(), 512, SCALE, causal=True)
    return out.reshape(tokens, heads, 512), lse.transpose(1, 2).reshape(tokens, heads)


def assert_matches(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor) -> None:
    out, lse = out.cpu().float(), lse.cpu()
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    error = (out.double() - ref_out.double()).norm() / ref_out.double().norm()
    assert error < 1e-2, f"relative error {error:.3e}"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "empty-row (+inf) positions differ"
    finite = ~torch.isinf(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), atol=2e-3, rtol=1e-3)


def vllm_query_halves(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [T, H, 576]`` as vLLM's MLA layer passes it: ``(q_nope [T, H, 512], q_pe [T, H, 64])``,
    q_nope a transposed view of the W_UK product's ``[H, T, 512]`` buffer, q_pe a view into the
    ``[T, H, 192]`` query projection whose 128 other columns hold NaN here."""
    q_nope = q[..., :512].transpose(0, 1).contiguous().transpose(0, 1)
    projection = torch.full((*q.shape[:2], 192), float("nan"), dtype=q.dtype, device=q.device)
    projection[..., 128:] = q[..., 512:]
    return q_nope, projection[..., 128:]


QUERY_FORMS = {
    "one tensor": lambda q: q,
    "halves of one tensor": lambda q: (q[..., :512], q[..., 512:]),
    "vllm layout": vllm_query_halves,
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("query_len", [1, 2])
@pytest.mark.parametrize("q_form", list(QUERY_FORMS))
def test_forward_mqa_matches_the_reference(device: str, block_size: int, query_len: int, q_form: str) -> None:
    dev = torch.device(device)
    lengths = [1, 64, 65, 300, 700, 0] if query_len == 1 else [2, 64, 65, 300, 700, 129]
    step = make_step(lengths, query_len, num_heads=16, block_size=block_size, device=dev, seed=block_size + query_len)
    builder = make_builder(dev, 16, block_size, full_cudagraphs=True, max_query_len=query_len)
    decode = step.build(builder)
    assert decode.query_len == query_len
    assert decode.block_table.shape == (len(lengths), step.block_table.shape[1] * block_size // 64)
    q = QUERY_FORMS[q_form](step.q)
    out, lse = make_impl().forward_mqa(q, step.cache, make_metadata(decode, len(lengths)), None)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_matches(out, lse, *reference(step, block_size))


@pytest.mark.parametrize("device", DEVICES)
def test_halves_off_16_bytes_are_concatenated_first(device: str) -> None:
    """A RoPE half whose head stride and base are off 16 bytes cannot be read in place by the
    kernel's 16-byte loads (the API would refuse it on a GPU): the backend concatenates."""
    dev = torch.device(device)
    step = make_step([3, 64, 700], 1, 16, 64, dev, seed=13)
    decode = step.build(make_builder(dev, 16, 64, full_cudagraphs=False))
    projection = torch.full((*step.q.shape[:2], 68), float("nan"), dtype=step.q.dtype, device=dev)
    projection[..., 4:] = step.q[..., 512:]
    q = (step.q[..., :512], projection[..., 4:])
    out, lse = make_impl().forward_mqa(q, step.cache, make_metadata(decode, 3), None)
    assert_matches(out, lse, *reference(step, 64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("query_len", [1, 2])
def test_no_lse_without_context_parallelism(device: str, query_len: int) -> None:
    """vLLM reads the LSE only to merge decode-context-parallel ranks: with one rank none is
    returned (for s_q > 1 its [T, H] layout would cost a copy per layer), and the output is the
    same as with the LSE."""
    dev = torch.device(device)
    step = make_step([3, 64, 700], query_len, 16, 64, dev, seed=12)
    decode = step.build(make_builder(dev, 16, 64, full_cudagraphs=False, max_query_len=query_len))
    out, lse = make_impl(dcp_world_size=1).forward_mqa(vllm_query_halves(step.q), step.cache,
                                                        make_metadata(decode, 3), None)
    assert lse is None
    with_lse, _ = make_impl().forward_mqa(vllm_query_halves(step.q), step.cache, make_metadata(decode, 3), None)
    assert torch.equal(out, with_lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_heads,query_len", [(16, 1), (16, 2), (128, 1)])
def test_split_query_gives_the_concatenated_result(device: str, num_heads: int, query_len: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's query halves read in place (the default) give the bits that concatenating them
    first (``FLASHMLA_BACKEND_SPLIT_QUERY=0``, vLLM's FlashMLA path) gives."""
    from flashmla_backend.settings import reload_settings

    dev = torch.device(device)
    step = make_step([5, 64, 700, 3000 if device == "cuda" else 300], query_len, num_heads, 64, dev, seed=9,
                     num_blocks=64, max_blocks=48)
    decode = step.build(make_builder(dev, num_heads, 64, full_cudagraphs=False, max_query_len=query_len))
    results = {}
    for split in ("1", "0"):
        monkeypatch.setenv("FLASHMLA_BACKEND_SPLIT_QUERY", split)
        reload_settings()
        results[split] = make_impl().forward_mqa(vllm_query_halves(step.q), step.cache, make_metadata(decode, 4), None)
    monkeypatch.undo()
    reload_settings()
    for got, want in zip(results["1"], results["0"]):
        assert torch.equal(got, want)
    assert_matches(*results["1"], *reference(step, 64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [64, 128])
def test_schedule_and_page_table_keep_their_addresses(device: str, block_size: int) -> None:
    dev = torch.device(device)
    builder = make_builder(dev, 16, block_size, full_cudagraphs=True)
    first = make_step([10, 500, 90], 1, 16, block_size, dev, seed=1).build(builder)
    second = make_step([700, 4, 64], 1, 16, block_size, dev, seed=2).build(builder)
    for name in ("tile_scheduler_metadata", "num_splits", "block_table"):
        if name == "block_table" and block_size == 64:
            continue  # vLLM's own persistent table is passed through
        assert getattr(first, name).data_ptr() == getattr(second, name).data_ptr(), name


def test_eager_builds_do_not_copy_the_schedule() -> None:
    builder = make_builder(torch.device("cpu"), 16, 64, full_cudagraphs=False)
    assert builder.tile_scheduler_metadata_buffer is None and builder.num_splits_buffer is None
    decode = make_step([10, 20], 1, 16, 64, torch.device("cpu"), seed=3).build(builder)
    assert decode.num_splits.shape == (3,)


def test_non_uniform_query_lengths_are_refused() -> None:
    dev = torch.device("cpu")
    step = make_step([10, 20], 2, 16, 64, dev, seed=4)
    decode = step.build(make_builder(dev, 16, 64, full_cudagraphs=False, max_query_len=2))
    with pytest.raises(ValueError, match="uniform query lengths"):
        make_impl().forward_mqa(step.q[:3], step.cache, make_metadata(decode, 2), None)


@requires_vllm_on_hopper
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("query_len", [1, 2])
def test_cuda_graph_replay_computes_the_next_step(block_size: int, query_len: int) -> None:
    """Capture one step, then change every input in place as vLLM does (sequence lengths,
    block table, queries, cache), rebuild the metadata and replay: the captured kernels must
    read the new schedule from the persistent buffers and compute the new step."""
    dev = torch.device("cuda", torch.cuda.current_device())
    heads = 16
    builder = make_builder(dev, heads, block_size, full_cudagraphs=True, max_query_len=query_len)
    impl = make_impl()
    sizes = {"num_blocks": 128, "max_blocks": 64}  # both steps share cache and table shapes
    step = make_step([100, 1000, 64, 7 * block_size], query_len, heads, block_size, dev, seed=5, **sizes)
    q_nope, q_pe = step.q[..., :512].clone(), step.q[..., 512:].clone()  # persistent inputs
    metadata = make_metadata(step.build(builder), 4)

    impl.forward_mqa((q_nope, q_pe), step.cache, metadata, None)  # warm-up, as vLLM does
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = impl.forward_mqa((q_nope, q_pe), step.cache, metadata, None)

    following = make_step([3000, 5, 640, 2 * block_size + 1], query_len, heads, block_size, dev, seed=6, **sizes)
    step.seq_lens.copy_(following.seq_lens)
    step.block_table.copy_(following.block_table)
    step.cache.copy_(following.cache)
    q_nope.copy_(following.q[..., :512])
    q_pe.copy_(following.q[..., 512:])
    rebuilt = step.build(builder)
    assert rebuilt.tile_scheduler_metadata.data_ptr() == metadata.decode.tile_scheduler_metadata.data_ptr()
    assert rebuilt.num_splits.data_ptr() == metadata.decode.num_splits.data_ptr()
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(out, lse, *reference(following, block_size))
