"""Exact pack / unpack round trips on odd shapes; packed size equals the bits accounting; golden
words of both layouts; each module's recorded format checked against its tensors."""

import pytest
import torch

from qdllm.packing.bits import pack_bits, unpack_bits
from qdllm.packing.format import KINDS, ModuleFormat
from qdllm.packing.linear import (
    PackedFormatError,
    pack_daq,
    pack_result,
    pack_uniform,
    unpack_daq,
    unpack_uniform,
)
from qdllm.quant import QuantSpec, quantize_weight
from qdllm.quant.daq import BinaryCode
from qdllm.quant.methods import METHODS
from qdllm.quant.uniform import UniformParams
from tests.conftest import correlated_second_moment, random_weight

SHAPE = (511, 350)  # 350 = 2 x 128 + a ragged group of 94 columns


@pytest.fixture(scope="module")
def problem():
    return random_weight(*SHAPE, 0), correlated_second_moment(SHAPE[1], 2048, 1)


SMALL = (96, 200)  # 3 groups of 64 columns + a ragged one of 8


@pytest.fixture(scope="module")
def small_problem():
    return random_weight(*SMALL, 2), correlated_second_moment(SMALL[1], 1024, 3)


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
    params, g_idx = state["params"], state.get("g_idx")
    tensors = pack_uniform(result.weight.float(), params, g_idx, bits, sym, result.group_size, torch.float16)
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
        result.weight.float(), result.state["params"], None, bits, False, result.group_size, torch.float16
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


def signed(word: int) -> int:
    """An unsigned 32-bit word as the int32 that stores it (two's complement)."""
    return word - 2**32 if word >= 2**31 else word


def golden_daq_codes() -> list[BinaryCode]:
    """2 x 40 weight, group_size 32: group 0 (columns 0..31) of order 2, group 1 (32..39) of order 1.
    Planes in storage order: g0 k0, g0 k1, g1 k0."""
    minus = -torch.ones(2, 40)
    g0k0, g0k1, g1k0 = minus[:, :32].clone(), minus[:, :32].clone(), minus[:, :8].clone()
    g0k0[0] = 1  # row 0: every sign +1
    g0k0[1, 31] = 1  # row 1: the last column only
    g0k1[0, ::2] = 1  # row 0: +1 on even columns; row 1: every sign -1
    g1k0[0, :4] = 1  # row 0: + + + + - - - -
    g1k0[1, 7] = 1  # row 1: the last column only
    group0 = BinaryCode(
        row_scales=torch.tensor([[[1.0, 0.5]], [[0.25, 0.125]]]),
        col_scales=torch.stack([torch.ones(1, 32), torch.full((1, 32), 0.5)]),
        signs=torch.stack([g0k0, g0k1]).unsqueeze(1),
        row_mean=None,
    )
    group1 = BinaryCode(
        row_scales=torch.tensor([[[2.0, 4.0]]]),
        col_scales=torch.arange(1.0, 9.0).view(1, 1, 8),
        signs=g1k0.view(1, 1, 2, 8),
        row_mean=None,
    )
    return [group0, group1]


def test_daq_golden_words_of_a_2x40_weight():
    """Sign bits by hand: per row, plane columns g0k0 (32) | g0k1 (32) | g1k0 (8) fill three words,
    column j of the stream at bit j % 32 of word j // 32 (1 = sign +1)."""
    codes = golden_daq_codes()
    tensors = pack_daq(codes, (2, 40), torch.float16)
    row0 = [
        signed(2**32 - 1),  # g0k0: all 32 bits set
        sum(1 << bit for bit in range(0, 32, 2)),  # g0k1: even bits = 0x55555555
        0b1111,  # g1k0: columns 0..3
    ]
    row1 = [
        signed(1 << 31),  # g0k0: column 31 only
        0,  # g0k1: no +1
        1 << 7,  # g1k0: column 7 only
    ]
    assert tensors["bcq_signs"].dtype == torch.int32
    assert tensors["bcq_signs"].tolist() == [row0, row1]
    assert tensors["bcq_k"].tolist() == [2, 1] and tensors["weight_shape"].tolist() == [2, 40]
    assert tensors["bcq_row_scale"].tolist() == [[1.0, 0.5], [0.25, 0.125], [2.0, 4.0]]
    assert tensors["bcq_col_scale"].tolist() == [1.0] * 32 + [0.5] * 32 + [float(c) for c in range(1, 9)]
    expected = torch.cat([code.dequantize()[0] for code in codes], dim=1)  # eq. 3, per group
    assert torch.equal(unpack_daq(tensors, 32), expected)


def test_uniform_golden_words_of_a_2x40_weight():
    """2-bit asymmetric codes, group_size 32 (widths 32 and 8): column c at bits 2c, 2c + 1 of the
    row's stream, so 16 columns fill a word. Row 0 repeats codes 0, 1, 2, 3 (one byte 0b11_10_01_00);
    row 1 is code 2 (0b10) in group 0 and code 1 (0b01) in group 1."""
    codes = torch.stack([torch.arange(40) % 4, torch.tensor([2] * 32 + [1] * 8)])
    scale = torch.tensor([[0.5, 0.25], [1.0, 2.0]])  # (G, R), exact in fp16
    zero = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    params = [UniformParams(scale[g], zero[g], maxq=3) for g in range(2)]
    g_of_col = torch.arange(40) // 32
    weight_q = scale[g_of_col].T * (codes - zero[g_of_col].T)
    tensors = pack_uniform(weight_q, params, None, [2, 2], False, 32, torch.float16)
    byte0 = 0b11100100
    row0 = [signed(byte0 * 0x01010101), signed(byte0 * 0x01010101), byte0 * 0x0101]
    row1 = [signed(0xAAAAAAAA), signed(0xAAAAAAAA), 0x5555]
    assert tensors["uq_codes"].tolist() == [row0, row1]
    # zero points: group 0 rows 0, 1 then group 1 rows 0, 1, two bits each: 1, 2, 3, 0
    assert tensors["uq_zero"].tolist() == [1 | 2 << 2 | 3 << 4 | 0 << 6]
    assert tensors["uq_bits"].tolist() == [2, 2] and tensors["uq_scale"].tolist() == scale.tolist()
    assert torch.equal(unpack_uniform(tensors, False, 32), weight_q)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_uniform_scales_are_stored_in_the_configured_dtype(small_problem, method, scale_dtype):
    """The quantizers round every scale to quant.scale_dtype: stored in it, unpacking is exact."""
    w, s = small_problem
    quant = QuantSpec.from_any({"method": method, "bits": 3, "group_size": 64, "scale_dtype": scale_dtype})
    inputs = torch.randn(512, SMALL[1], generator=torch.Generator().manual_seed(5))
    result = quantize_weight(w, s, quant, inputs=inputs, return_state=True)
    fmt, tensors = pack_result(result, quant, SMALL)
    assert fmt == ModuleFormat("uniform", 64, scale_dtype, False)
    assert tensors["uq_scale"].dtype == quant.torch_scale_dtype
    assert torch.equal(unpack_uniform(tensors, fmt.sym, fmt.group_size).to(w.dtype), result.weight)


def test_slim_packs_its_asymmetric_grids_when_quant_sym_is_set(small_problem):
    """SliM-LLM fits asymmetric grids whatever quant.sym says: the format follows the quantizer
    (here with fp32 scales, which its binarised groups' row means share)."""
    w, s = small_problem
    cfg = {"method": "slim", "bits": 2, "group_size": 32, "sym": True, "scale_dtype": "float32"}
    quant = QuantSpec.from_any(cfg)
    inputs = torch.randn(512, SMALL[1], generator=torch.Generator().manual_seed(6))
    result = quantize_weight(w, s, quant, inputs=inputs, return_state=True)
    fmt, tensors = pack_result(result, quant, SMALL)
    assert fmt == ModuleFormat("uniform", 32, "float32", False) and "uq_zero" in tensors
    assert 0 in tensors["uq_bits"] and tensors["uq_mean"].dtype == torch.float32  # a binarised group
    assert torch.equal(unpack_uniform(tensors, fmt.sym, fmt.group_size).to(w.dtype), result.weight)


def test_every_quantization_method_has_a_packed_format():
    """pack=true is valid with every method ("none" writes nothing): no method may lack a format."""
    assert all(m.pack_kind in KINDS for m in METHODS.values() if m.quantizes)


@pytest.fixture(scope="module")
def packed_rtn(small_problem):
    w, s = small_problem
    quant = QuantSpec.from_any({"method": "rtn", "bits": 2, "group_size": 64})
    return pack_result(quantize_weight(w, s, quant, return_state=True), quant, SMALL)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"group_size": 32}, "group_size=32 makes 7 groups of 200 columns, but uq_bits has 4"),
        ({"scale_dtype": "float32"}, "scale_dtype='float32' but uq_scale is stored as torch.float16"),
        ({"sym": True}, "sym=True but the module stores zero points"),
    ],
)
def test_a_format_that_disagrees_with_the_tensors_names_module_and_field(packed_rtn, change, match):
    fmt, tensors = packed_rtn
    fmt.check("blocks.0.q", tensors)
    wrong = ModuleFormat.from_json("blocks.0.q", {**fmt.to_json(), **change})
    with pytest.raises(PackedFormatError, match=f"module blocks.0.q: {match}"):
        wrong.check("blocks.0.q", tensors)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("uniform", "its format is 'uniform', not a mapping"),
        ({"kind": "int4", "group_size": 64, "scale_dtype": "float16"}, "kind='int4' must be one of"),
        ({"kind": "uniform", "scale_dtype": "float16", "sym": False}, r"missing \['group_size'\]"),
        ({"kind": "bcq", "group_size": 64, "scale_dtype": "float16", "sym": True}, r"unknown \['sym'\]"),
        ({"kind": "bcq", "group_size": 0, "scale_dtype": "float16"}, "group_size=0 must be a positive int"),
        ({"kind": "bcq", "group_size": 64, "scale_dtype": "fp8"}, "scale_dtype='fp8' must be one of"),
        ({"kind": "uniform", "group_size": 64, "scale_dtype": "float16", "sym": "no"}, "sym='no' must be"),
    ],
)
def test_a_bad_recorded_format_names_module_and_field(raw, match):
    with pytest.raises(PackedFormatError, match=f"module blocks.0.q: .*{match}"):
        ModuleFormat.from_json("blocks.0.q", raw)
