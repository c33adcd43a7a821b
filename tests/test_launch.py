"""The packed-argument launcher (``flashmla_backend/launch.py``): argument packing on CPU; on a
Hopper GPU, every signature matches its kernel's parameter sizes and a wrong one is refused."""

from __future__ import annotations

import ctypes
import struct

import pytest
import torch

from conftest import requires_hopper
from flashmla_backend.kernel_sources import (
    COMBINE_SIGNATURE,
    SCHEDULE_SIGNATURE,
    DecodeLaunchContract,
    decode_signature,
)
from flashmla_backend.launch import KernelSignature, LaunchError, launch_attributes


def _unpack(signature: KernelSignature, params: ctypes.Array) -> list[bytes]:
    """The bytes each parameter pointer points at."""
    return [ctypes.string_at(params[i], size) for i, size in enumerate(signature.sizes)]


def test_pack_keeps_each_parameter_width_and_value() -> None:
    sig = KernelSignature("k", "128s Q q i f i")
    assert sig.sizes == (128, 8, 8, 4, 4, 4) and sig.offsets == (0, 128, 136, 144, 148, 152)
    tensor_map = bytes(range(128))
    raw = _unpack(sig, sig.pack((tensor_map, 0x7F00_0000_1234, -3, -7, 0.5, True)))
    assert raw[0] == tensor_map
    assert struct.unpack("<Q", raw[1])[0] == 0x7F00_0000_1234
    assert struct.unpack("<q", raw[2])[0] == -3
    assert struct.unpack("<i", raw[3])[0] == -7
    assert struct.unpack("<f", raw[4])[0] == 0.5  # a Python float goes in as a float32
    assert struct.unpack("<i", raw[5])[0] == 1


def test_pack_reuses_one_buffer_per_thread() -> None:
    sig = KernelSignature("k", "i i")
    first = sig.pack((1, 2))
    second = sig.pack((3, 4))
    assert first is second and [struct.unpack("<i", b)[0] for b in _unpack(sig, second)] == [3, 4]


@pytest.mark.parametrize("args", [(1,), (1, 2, 3), (1, "x"), (1, 1.5), (1 << 40, 2)])
def test_pack_refuses_what_does_not_fit(args: tuple) -> None:
    with pytest.raises(LaunchError, match="k"):
        KernelSignature("k", "i i").pack(args)


def test_decode_signature_follows_the_contract() -> None:
    plain = decode_signature(DecodeLaunchContract(64, False, False))
    full = decode_signature(DecodeLaunchContract(64, True, True))
    assert len(plain.codes) == 20 and plain.codes[0] == "128s"
    assert full.codes[:20] == plain.codes and full.codes[20:] == ("Q", "q", "q", "i")
    with_rope = decode_signature(DecodeLaunchContract(64, True, True, True))
    assert with_rope.codes[:24] == full.codes and with_rope.codes[24:] == ("Q", "q", "q", "q")


@requires_hopper
def test_signatures_match_the_kernels() -> None:
    from flashmla_backend.kernel_sources import SCHEDULE_MODULE, combine_module, decode_launch_contract, decode_module
    from flashmla_backend.launch import check_signature, count_parameters
    from flashmla_backend.runtime import get_kernel

    pairs = [(get_kernel(SCHEDULE_MODULE, "mla_schedule", 0), SCHEDULE_SIGNATURE)]
    for dtype in (torch.bfloat16, torch.float16):
        pairs.append((get_kernel(combine_module(dtype), "mla_combine", 0), COMBINE_SIGNATURE))
        module = decode_module(dtype)
        pairs.append((get_kernel(module, "mla_decode", 0), decode_signature(decode_launch_contract(module))))
    for function, signature in pairs:
        check_signature(function, signature)
        assert count_parameters(function) == len(signature.codes), signature
    schedule = pairs[0][0]
    with pytest.raises(LaunchError, match="parameter 1"):
        check_signature(schedule, KernelSignature("mla_schedule", "Q q i i i i Q Q"))
    with pytest.raises(LaunchError, match="parameters"):
        check_signature(schedule, KernelSignature("mla_schedule", "Q i i i i i Q Q Q"))


@pytest.mark.parametrize("programmatic", [False, True])
def test_launch_attributes_hold_what_the_driver_reads(programmatic: bool) -> None:
    # CUlaunchAttribute: id (4 bytes), 4 bytes of padding, a 64-byte value union, 72 in all.
    attributes = launch_attributes(programmatic)
    assert ctypes.sizeof(attributes) == 72 * len(attributes)
    raw = bytes(attributes)
    records = [(struct.unpack_from("<i", raw, i)[0], raw[i + 8:i + 12]) for i in range(0, len(raw), 72)]
    assert records == ([(6, struct.pack("<i", 1))] if programmatic else [])


@requires_hopper
def test_combine_occupancy_is_whole_ctas() -> None:
    """The combine's rule sizes its grid to one wave of resident CTAs: at least one per SM."""
    from flashmla_backend._constants import COMBINE_WARPS
    from flashmla_backend.kernel_sources import combine_module
    from flashmla_backend.launch import resident_ctas_per_sm
    from flashmla_backend.runtime import get_kernel

    per_sm = resident_ctas_per_sm(get_kernel(combine_module(torch.bfloat16), "mla_combine", 0), COMBINE_WARPS * 32, 0)
    assert 1 <= per_sm <= 2048 // (COMBINE_WARPS * 32)


def test_combine_requests_per_cta_keeps_one_wave() -> None:
    from flashmla_backend._constants import COMBINE_MAX_REQUESTS_PER_CTA
    from flashmla_backend.api import _combine_requests_per_cta

    resident = 264
    for batch in (1, 7, 64, 128, 1000, 48 * 1024):
        for column_ctas in (1, 2, 8, 32):
            k = _combine_requests_per_cta(batch, column_ctas, resident, 0)
            ctas = column_ctas * -(-batch // k)
            assert 1 <= k <= COMBINE_MAX_REQUESTS_PER_CTA
            # One wave where the cap allows it; no fewer requests per CTA would fit one wave.
            assert ctas <= resident or k == COMBINE_MAX_REQUESTS_PER_CTA or column_ctas > resident
            assert k == 1 or column_ctas * -(-batch // (k - 1)) > resident
    assert _combine_requests_per_cta(128, 8, resident, 3) == 3  # the setting forces a count
