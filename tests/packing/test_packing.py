"""Exact pack / unpack round trips on odd shapes; packed size equals the bits accounting."""

import pytest
import torch

from qdllm.packing.bits import pack_bits, pack_codes, unpack_bits, unpack_codes
from qdllm.packing.linear import PackedFormatError, pack_daq, pack_uniform, unpack_daq, unpack_uniform
from qdllm.quant import quantize_weight
from tests.conftest import correlated_second_moment, random_weight

SHAPE = (511, 350)  # 350 = 2 x 128 + a ragged group of 94 columns


@pytest.fixture(scope="module")
def problem():
    return random_weight(*SHAPE, 0), correlated_second_moment(SHAPE[1], 2048, 1)


def packed_bits(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() * 8 for t in tensors.values())


@pytest.mark.parametrize("n", [1, 31, 32, 33, 350])
def test_bits_round_trip_and_little_endian_order(n):
    bits = torch.rand(4, n, generator=torch.Generator().manual_seed(n)) > 0.5
    words = pack_bits(bits)
    assert words.shape == (4, -(-n // 32)) and words.dtype == torch.int32
    assert torch.equal(unpack_bits(words, n), bits)
    first = torch.zeros(1, 32, dtype=torch.bool)
    first[0, 0] = True
    assert pack_bits(first).item() == 1  # element 0 is bit 0


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_codes_round_trip(bits):
    codes = torch.randint(0, 2**bits, (5, 350), generator=torch.Generator().manual_seed(bits))
    words = pack_codes(codes, bits)
    assert words.shape == (5, -(-350 * bits // 32)) and torch.equal(unpack_codes(words, 350, bits), codes)
    with pytest.raises(ValueError):
        pack_codes(codes + 2**bits, bits)


@pytest.mark.parametrize(
    "cfg",
    [
        {"method": "daq", "bits": 1, "abmp_ratio": 0.0},
        {"method": "daq", "bits": 2, "abmp_ratio": 0.0},
        {"method": "daq", "bits": 3, "abmp_ratio": 0.0},
        {"method": "daq", "bits": 2, "abmp_ratio": 0.3},  # mixed orders 1 / 2 / 3
        {"method": "daq", "bits": 2, "abmp_ratio": 0.0, "row_center": True},
    ],
)
def test_daq_round_trip_is_exact_and_sized_like_the_accounting(problem, cfg):
    w, s = problem
    result = quantize_weight(w, s, cfg, return_state=True)
    tensors = pack_daq(result.state["codes"], SHAPE, torch.float16)
    assert torch.equal(unpack_daq(tensors, result.group_size).to(w.dtype), result.weight)
    assert tensors["bcq_k"].tolist() == result.orders.tolist()
    assert packed_bits(tensors) / (SHAPE[0] * SHAPE[1]) == pytest.approx(result.bits_per_weight, rel=0.01)


@pytest.mark.parametrize(
    "cfg",
    [
        {"method": "rtn", "bits": 2},
        {"method": "gptq", "bits": 3},
        {"method": "gptq", "bits": 4, "sym": True},
        {"method": "gptq", "bits": 2, "act_order": True},
    ],
)
def test_uniform_round_trip_is_exact_and_sized_like_the_accounting(problem, cfg):
    w, s = problem
    result = quantize_weight(w, s, cfg, return_state=True)
    state, sym = result.state, cfg.get("sym", False)
    bits = [cfg["bits"]] * len(state["params"])
    tensors = pack_uniform(
        result.weight.float(), state["params"], state.get("g_idx"), bits, sym, result.group_size
    )
    assert torch.equal(unpack_uniform(tensors, sym, result.group_size).to(w.dtype), result.weight)
    per_weight = packed_bits(tensors) / (SHAPE[0] * SHAPE[1])
    expected = result.bits_per_weight + (32 / SHAPE[0] if "uq_g_idx" in tensors else 0)  # act-order's g_idx
    assert per_weight == pytest.approx(expected, rel=0.01)


def test_slim_mixed_and_binarised_groups_round_trip(problem):
    w, s = problem
    x = torch.randn(1024, SHAPE[1], generator=torch.Generator().manual_seed(3))
    result = quantize_weight(
        w, s, {"method": "slim", "bits": 2, "group_size": 32}, inputs=x, return_state=True
    )
    bits = result.orders.tolist()
    assert 1 in bits and 3 in bits  # binarised and 3-bit groups are present
    tensors = pack_uniform(
        result.weight.float(), result.state["params"], None, bits, False, result.group_size
    )
    assert torch.equal(unpack_uniform(tensors, False, result.group_size).to(w.dtype), result.weight)
    assert packed_bits(tensors) / (SHAPE[0] * SHAPE[1]) == pytest.approx(result.bits_per_weight, rel=0.01)


def test_tensors_that_disagree_with_the_shape_fail_clearly(problem):
    w, s = problem
    result = quantize_weight(w, s, {"method": "daq"}, return_state=True)
    tensors = pack_daq(result.state["codes"], SHAPE, torch.float16)
    with pytest.raises(PackedFormatError, match="group_size 64"):
        unpack_daq(tensors, 64)
    broken = {**tensors, "bcq_k": tensors["bcq_k"][:-1]}
    with pytest.raises(PackedFormatError, match="orders"):
        unpack_daq(broken, result.group_size)
