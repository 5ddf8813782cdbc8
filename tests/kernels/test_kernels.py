"""Packed-Linear kernels against the reference dequantization (`unpack_daq` / `unpack_uniform`):
dequantized blocks bitwise equal, fused matmuls within bf16 rounding of the float64 product, on odd
shapes, every BCQ order mix and every uniform width; plus the CPU path and the group offsets."""

import pytest
import torch
import torch.nn.functional as F

from qdllm.kernels import FusedConfig, GemvConfig, PackedMatmul
from qdllm.kernels.dispatch import fused_config, gemv_config, scratch
from qdllm.kernels.layout import bcq_layout, padded_group, uniform_layout
from qdllm.packing.bits import unpack_bits
from qdllm.packing.format import ModuleFormat
from qdllm.packing.linear import PackedFormatError, unpack_daq, unpack_uniform
from qdllm.packing.module import QuantizedLinear
from tests.kernels.conftest import kernel_devices, random_bcq, random_uniform, relative_error, to_device

BF16_RTOL = 1e-2  # bf16 operands: 1e-3 .. 1e-2 relative to the float64 product
SHAPES = [(511, 350, 128), (576, 1536, 128), (1536, 576, 64)]  # 350 = 2 x 128 + a ragged 94


def mixed_orders(groups: int, mix: str) -> list[int]:
    if mix == "mixed":
        return [1 + g % 3 for g in range(groups)]
    return [int(mix)] * groups


def bcq_cases():
    for rows, cols, group_size in SHAPES:
        groups = -(-cols // group_size)
        for mix in ("1", "2", "3", "mixed"):
            yield rows, cols, group_size, mixed_orders(groups, mix), mix == "mixed"


def uniform_cases():
    """(bits per group, binarised per group, sym, act_order) on each shape."""
    for rows, cols, group_size in SHAPES:
        groups = -(-cols // group_size)
        for bits in (2, 3, 4):
            yield rows, cols, group_size, [bits] * groups, [False] * groups, False, False
        yield rows, cols, group_size, [4] * groups, [False] * groups, True, False
        yield rows, cols, group_size, [2] * groups, [False] * groups, False, True
        slim = [(1, True), (2, False), (3, False), (1, False)]  # SliM-LLM: binarised, 2-, 3-bit groups
        mix = [slim[g % 4] for g in range(groups)]
        yield rows, cols, group_size, [b for b, _ in mix], [x for _, x in mix], False, False


def bcq_layer(rows, cols, group_size, orders, row_center):
    tensors = random_bcq(rows, cols, group_size, orders, row_center, seed=rows + cols)
    return "bcq", tensors, group_size, False, unpack_daq(tensors, group_size)


def uniform_layer(rows, cols, group_size, bits, binary, sym, act_order):
    tensors = random_uniform(rows, cols, group_size, bits, binary, sym, act_order, seed=rows * 7 + cols)
    return "uniform", tensors, group_size, sym, unpack_uniform(tensors, sym, group_size)


def case_id(case) -> str:
    rows, cols, group_size, bits = case[1][:4]
    tail = (
        f"K{bits[:3]}-mean{case[1][4]}"
        if case[0] == "bcq"
        else f"b{bits[:4]}-sym{case[1][5]}-act{case[1][6]}"
    )
    return f"{case[0]}-{rows}x{cols}g{group_size}-{tail}"


CASES = [("bcq", c) for c in bcq_cases()] + [("uniform", c) for c in uniform_cases()]


@pytest.fixture(scope="module", params=CASES, ids=case_id)
def layer(request):
    kind, case = request.param
    return bcq_layer(*case) if kind == "bcq" else uniform_layer(*case)


def inputs(tokens: int, cols: int, device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, cols, generator=gen).bfloat16().to(device)


@pytest.mark.parametrize("device", kernel_devices())
def test_dequantized_rows_equal_the_reference_bitwise(layer, device):
    kind, tensors, group_size, sym, reference = layer
    plan = PackedMatmul(to_device(tensors, device), kind, group_size, sym)
    rows, cols = reference.shape
    whole = torch.full((rows, cols), float("nan"), device=device)
    plan.dequantize_rows(whole, 0)
    assert torch.equal(whole.cpu(), reference)
    block = torch.full((37, cols), float("nan"), device=device)  # an odd block from an odd row
    plan.dequantize_rows(block, rows - 37)
    assert torch.equal(block.cpu(), reference[-37:])


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("tokens", [1, 5, 16, 17, 64])
def test_fused_matmul_matches_the_float64_product(layer, device, tokens):
    kind, tensors, group_size, sym, reference = layer
    plan = PackedMatmul(to_device(tensors, device), kind, group_size, sym)
    x = inputs(tokens, reference.shape[1], device, seed=tokens)
    exact = x.double().cpu() @ reference.double().T
    for config in (None, FusedConfig(32, 16, plan.groups), FusedConfig(64, 32, 1)):  # no split / 1 group each
        y = plan.fused(x, config)
        assert y.dtype == x.dtype and y.shape == exact.shape
        assert relative_error(y.cpu(), exact) < BF16_RTOL, config


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("tokens", [1, 3, 4])
def test_gemv_matches_the_float64_product(layer, device, tokens):
    kind, tensors, group_size, sym, reference = layer
    plan = PackedMatmul(to_device(tensors, device), kind, group_size, sym)
    x = inputs(tokens, reference.shape[1], device, seed=tokens)
    if kind != "bcq":  # the CUDA-core kernel reads BCQ only: refused by name, never misread
        with pytest.raises(ValueError, match="BCQ layers only"):
            plan.gemv(x)
        return
    exact = x.double().cpu() @ reference.double().T
    for config in (None, GemvConfig(4, plan.groups), GemvConfig(16, 1, num_warps=2)):  # no split / 1 each
        y = plan.gemv(x, config)
        assert y.dtype == x.dtype and y.shape == exact.shape
        assert relative_error(y.cpu(), exact) < BF16_RTOL, config


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("tokens", [65, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blocked_matmul_matches_the_reference_weight(layer, device, tokens, dtype):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter truncates to bf16 where the GPU rounds to nearest")
    kind, tensors, group_size, sym, reference = layer
    plan = PackedMatmul(to_device(tensors, device), kind, group_size, sym)
    x = inputs(tokens, reference.shape[1], device, seed=tokens)
    block_bytes = 96 * reference.shape[1] * dtype.itemsize  # 96-row blocks: several, the last one ragged
    y = plan.blocked(x, dtype, block_bytes)
    exact = x.double().cpu() @ reference.to(dtype).double().T  # the weight the reference path multiplies
    assert y.dtype == x.dtype and relative_error(y.cpu(), exact) < 3e-3  # the output's bf16 rounding: ~1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("tokens", [(1, 1), (1, 3), (4, 100)])  # gemv (BCQ), fused, blocked; 3-D input
def test_quantized_linear_on_cuda_runs_the_kernels_not_the_reference(tokens, monkeypatch):
    import qdllm.packing.module as module

    def refuse(*args, **kwargs):
        raise AssertionError("the CUDA forward unpacked the weight")

    slim = [1, 2, 3]
    layers = [
        bcq_layer(511, 350, 128, [1, 2, 3], True),
        uniform_layer(511, 350, 128, slim, [True, False, False], False, False),
    ]
    for kind, tensors, group_size, sym, reference in layers:
        bias = torch.randn(reference.shape[0]).bfloat16()
        fmt = ModuleFormat.of_tensors(kind, group_size, tensors, sym)
        layer = QuantizedLinear(tensors, fmt, torch.bfloat16, bias).cuda()
        x = torch.randn(*tokens, reference.shape[1]).bfloat16()
        with monkeypatch.context() as patch:
            patch.setattr(module, "unpack_daq", refuse)
            patch.setattr(module, "unpack_uniform", refuse)
            y = layer(x.cuda())
        exact = x.double() @ reference.double().T + bias.double()
        assert y.shape == exact.shape and relative_error(y.cpu(), exact) < BF16_RTOL
        assert layer._dequantized is None


def test_the_cpu_forward_is_the_reference_path():
    """No CUDA: F.linear on the dequantized weight, bit for bit, with or without `kernel`."""
    _, tensors, group_size, _, reference = bcq_layer(511, 350, 128, [1, 2, 3], True)
    x = torch.randn(2, 3, reference.shape[1]).bfloat16()
    for kernel in (True, False):
        fmt = ModuleFormat.of_tensors("bcq", group_size, tensors)
        layer = QuantizedLinear(tensors, fmt, torch.bfloat16, kernel=kernel)
        assert torch.equal(layer(x), F.linear(x, reference.bfloat16()))


def test_bcq_offsets_point_at_each_planes_bits():
    """Plane k of group g read at bit[g] + k w_g of the stream is that plane's sign matrix."""
    rows, cols, group_size = 9, 350, 128
    orders = [3, 1, 2]
    tensors = random_bcq(rows, cols, group_size, orders, False, seed=0)
    layout = bcq_layout(tensors, group_size, torch.device("cpu"))
    assert layout.order.tolist() == orders and layout.plane.tolist() == [0, 3, 4]
    assert layout.bit.tolist() == [0, 3 * 128, 3 * 128 + 128]
    stream = unpack_bits(tensors["bcq_signs"], int(tensors["bcq_col_scale"].numel()))
    widths = [128, 128, 94]
    weight = torch.zeros(rows, cols)
    for g, (order, width) in enumerate(zip(orders, widths, strict=True)):
        for k in range(order):
            start = int(layout.bit[g]) + k * width
            a = tensors["bcq_row_scale"][int(layout.plane[g]) + k].float()
            c = tensors["bcq_col_scale"][start : start + width].float()
            weight[:, g * 128 : g * 128 + width] += (
                a[:, None] * c[None, :] * (stream[:, start : start + width] * 2.0 - 1)
            )
    assert torch.equal(weight, unpack_daq(tensors, group_size))


def test_uniform_offsets_follow_the_group_widths_and_act_order():
    rows, cols, group_size = 5, 40, 16
    bits, binary = [3, 1, 2], [False, True, False]
    tensors = random_uniform(rows, cols, group_size, bits, binary, False, True, seed=1)
    layout = uniform_layout(tensors, group_size, torch.device("cpu"))
    g_idx = tensors["uq_g_idx"].long()
    assert layout.code_bits.tolist() == bits and layout.mean_index.tolist() == [-1, 0, -1]
    assert layout.zero_bit.tolist() == [0, 3 * rows, 3 * rows]  # binarised groups store no zero point
    col_bits = torch.tensor(bits)[g_idx]
    assert layout.col_bit.tolist() == [int(col_bits[:c].sum()) for c in range(cols)]
    assert (g_idx[layout.perm.long()] == torch.arange(cols) // group_size).all() and layout.same_bits is None


def test_act_order_groups_of_unequal_size_fail_clearly():
    tensors = random_uniform(4, 32, 16, [2, 2], [False, False], False, True, seed=2)
    tensors["uq_g_idx"] = torch.tensor([0] * 20 + [1] * 12, dtype=torch.int32)
    with pytest.raises(PackedFormatError, match="uq_g_idx.*kernel=False"):
        uniform_layout(tensors, 16, torch.device("cpu"))
    with pytest.raises(PackedFormatError, match="bcq_k has 3 groups.*group_size 32 has 2"):
        bcq_layout(random_bcq(4, 40, 16, [1, 1, 1], False, seed=3), 32, torch.device("cpu"))


def test_launch_shapes_fill_the_gpu_and_cover_every_group():
    for rows, groups, tokens in [(4096, 32, 1), (12288, 32, 16), (4096, 96, 64), (7, 3, 1)]:
        config = fused_config(rows, groups, tokens, processors=132)
        programs = -(-rows // config.block_rows) * -(-tokens // config.block_tokens)
        splits = -(-groups // config.groups_per_program)
        assert (splits - 1) * config.groups_per_program < groups <= splits * config.groups_per_program
        assert programs * splits >= min(4 * 132, programs * groups) and config.block_tokens >= min(tokens, 16)
    assert padded_group(128) == 128 and padded_group(16) == 32 and padded_group(96) == 128
    for rows, groups, tokens in [(4096, 32, 1), (4096, 96, 4), (12288, 32, 3), (7, 3, 1)]:
        config = gemv_config(rows, groups, tokens, processors=132)
        splits = -(-groups // config.groups_per_program)
        tokens_padded = 1 << (tokens - 1).bit_length()
        assert config.block_rows * tokens_padded <= 32 and config.block_rows >= 4
        assert -(-rows // config.block_rows) * splits >= min(4 * 132, -(-rows // config.block_rows) * groups)


def test_scratch_is_one_buffer_that_grows():
    first = scratch(10, torch.device("cpu"), torch.float32)
    again = scratch(8, torch.device("cpu"), torch.float32)
    assert again.data_ptr() == first.data_ptr() and again.numel() == 8
    assert scratch(20, torch.device("cpu"), torch.float32).numel() == 20
