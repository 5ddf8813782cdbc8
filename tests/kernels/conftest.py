"""Random packed layers (any shape, order mix, code width) and the devices the kernels run on."""

import importlib.util
import os

import pytest
import torch

from qdllm.packing.linear import pack_daq, pack_uniform
from qdllm.quant.daq import BinaryCode
from qdllm.quant.groups import group_widths
from qdllm.quant.slim import BinaryParams
from qdllm.quant.uniform import UniformParams

HAS_TRITON = importlib.util.find_spec("triton") is not None


def kernel_devices() -> list:
    """cuda with Triton; cpu too under Triton's interpreter (TRITON_INTERPRET=1), a slow local check."""
    gpu = pytest.param("cuda", marks=pytest.mark.gpu)
    devices = [gpu] if torch.cuda.is_available() and HAS_TRITON else []
    if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        devices.append("cpu")
    return devices or [
        pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skip(reason="needs CUDA + Triton")])
    ]


def fp16(values: torch.Tensor) -> torch.Tensor:
    """Values as the format stores them, so re-quantizing at packing time changes nothing."""
    return values.half().float()


def random_bcq(rows: int, cols: int, group_size: int, orders: list[int], row_center: bool, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    codes = []
    for order, width in zip(orders, group_widths(cols, group_size), strict=True):
        signs = (torch.rand(order, 1, rows, width, generator=gen) > 0.5).float() * 2 - 1
        row_scales = fp16(torch.rand(order, 1, rows, generator=gen) * 0.02 + 1e-3)
        col_scales = fp16(torch.rand(order, 1, width, generator=gen) + 0.5)
        mean = fp16(torch.randn(1, rows, generator=gen) * 0.01) if row_center else None
        codes.append(BinaryCode(row_scales, col_scales, signs, mean))
    return pack_daq(codes, (rows, cols), torch.float16)


def random_uniform(
    rows: int,
    cols: int,
    group_size: int,
    bits: list[int],
    binary: list[bool],
    sym: bool,
    act_order: bool,
    seed: int,
) -> dict:
    """`bits` per group (1 for a binarised group, marked in `binary`); act-order shuffles which
    columns each group holds."""
    gen = torch.Generator().manual_seed(seed)
    g_idx = torch.arange(cols) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(cols, generator=gen)]
    weight = torch.empty(rows, cols)
    params = []
    for g, (b, is_binary) in enumerate(zip(bits, binary, strict=True)):
        columns = (g_idx == g).nonzero()[:, 0]
        codes = torch.randint(0, 2**b, (rows, len(columns)), generator=gen).float()
        scale = fp16(torch.rand(rows, generator=gen) * 0.02 + 1e-3)
        if is_binary:
            mean = fp16(torch.randn(rows, generator=gen) * 0.01)
            params.append(BinaryParams(mean, scale))
            weight[:, columns] = mean[:, None] + scale[:, None] * (2 * codes - 1)
            continue
        zero = (
            torch.full((rows,), 2.0 ** (b - 1))
            if sym
            else torch.randint(0, 2**b, (rows,), generator=gen).float()
        )
        params.append(UniformParams(scale, zero, 2**b - 1))
        weight[:, columns] = scale[:, None] * (codes - zero[:, None])
    return pack_uniform(weight, params, g_idx if act_order else None, bits, sym, group_size, torch.float16)


def to_device(tensors: dict, device) -> dict:
    return {k: v.to(device) for k, v in tensors.items()}


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y.double() - reference).norm() / reference.norm())
