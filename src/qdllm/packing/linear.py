"""One quantized Linear as packed tensors and back, sized exactly like `qdllm.quant.accounting`.

Binary-coded (DAQ), column groups g of width w_g with order K_g; the planes p run over the groups,
then the orders (P = sum_g K_g planes, n = sum_g K_g w_g plane columns):
    bcq_k          int8   (G,)                order of each group
    bcq_signs      int32  (R, ceil(n / 32))   per row, the sign bits of every plane's columns in
                                              plane order (1 = +1, little-endian)
    bcq_row_scale  scale  (P, R)              a_p
    bcq_col_scale  scale  (n,)                c_p of each plane, concatenated
    bcq_row_mean   scale  (G, R)              only with row centring
Uniform (RTN, GPTQ, GPTAQ, SliM-LLM), codes in the original column order:
    uq_bits        int8   (G,)                bits of each group; 0 = a binarised 1-bit group
    uq_codes       int32  (R, ceil(sum_c bits_c / 32))   every column's code as a bit stream
    uq_scale       scale  (G, R)              step (binarised: the scale of mean +- scale)
    uq_zero        int32  (ceil(R sum_g b_g / 32),)      zero points of the uniform groups, in
                                              group order (asymmetric only)
    uq_mean        scale  (G_binary, R)       row means of the binarised groups
    uq_g_idx       int32  (C,)                group of each column, when not c // group_size
    uq_input_scale scale  (C,)                AWQ's input scale s: the codes store Q(W diag(s)),
                                              the weight is Q(W diag(s)) diag(s)^-1
Both: weight_shape int32 (2,). "scale" is the configured `quant.scale_dtype` (the quantizers round
every scale to it, so storing it keeps the weights exact). Nothing is padded, so the file size
equals the reported bits per weight up to one partial word per row. Unpacking recomputes the
fake-quantized weight exactly (fp32).
"""

from __future__ import annotations

import torch

from qdllm.packing.bits import pack_bits, unpack_bits
from qdllm.packing.format import INPUT_SCALE_KEY, ModuleFormat, PackedFormatError
from qdllm.quant.daq import BinaryCode
from qdllm.quant.groups import group_slices
from qdllm.quant.methods import get_method
from qdllm.quant.uniform import UniformParams


def pack_daq(codes: list[BinaryCode], shape: tuple[int, int], scale_dtype: torch.dtype) -> dict:
    """`codes`: one BinaryCode per column group (a G axis of length 1), as `quantize_weight`
    returns them with `return_state=True`."""
    signs, row_scales, col_scales, means = [], [], [], []
    for code in codes:
        for k in range(code.order):
            signs.append(code.signs[k, 0] > 0)
            row_scales.append(code.row_scales[k, 0])
            col_scales.append(code.col_scales[k, 0])
        if code.row_mean is not None:
            means.append(code.row_mean[0])
    out = {
        "bcq_k": torch.tensor([c.order for c in codes], dtype=torch.int8),
        "bcq_signs": pack_bits(torch.cat(signs, dim=1)),
        "bcq_row_scale": torch.stack(row_scales).to(scale_dtype),
        "bcq_col_scale": torch.cat(col_scales).to(scale_dtype),
        "weight_shape": torch.tensor(shape, dtype=torch.int32),
    }
    if means:
        out["bcq_row_mean"] = torch.stack(means).to(scale_dtype)
    return out


def unpack_daq(tensors: dict, group_size: int) -> torch.Tensor:
    rows, cols = (int(x) for x in tensors["weight_shape"])
    orders = tensors["bcq_k"].tolist()
    slices = group_slices(cols, group_size)
    widths = [sl.stop - sl.start for sl in slices]
    plane_cols = sum(k * w for k, w in zip(orders, widths, strict=False))
    if (
        len(orders) != len(slices)
        or tensors["bcq_row_scale"].shape != (sum(orders), rows)
        or tensors["bcq_col_scale"].shape != (plane_cols,)
        or tensors["bcq_signs"].shape != (rows, -(-plane_cols // 32))
    ):
        raise PackedFormatError(
            f"packed BCQ tensors do not fit weight_shape {rows}x{cols}, group_size {group_size} and "
            f"orders {orders}: got signs {tuple(tensors['bcq_signs'].shape)}, row scales "
            f"{tuple(tensors['bcq_row_scale'].shape)}, col scales {tuple(tensors['bcq_col_scale'].shape)}"
        )
    signs = unpack_bits(tensors["bcq_signs"], plane_cols).float() * 2 - 1
    row_scale = tensors["bcq_row_scale"].float()
    col_scale = tensors["bcq_col_scale"].float()
    means = tensors.get("bcq_row_mean")
    weight = torch.empty(rows, cols, dtype=torch.float32, device=signs.device)
    plane, col = 0, 0
    for g, (order, sl) in enumerate(zip(orders, slices, strict=True)):
        width = sl.stop - sl.start
        q = torch.zeros(rows, width, dtype=torch.float32, device=weight.device)
        for _ in range(order):
            a, c = row_scale[plane], col_scale[col : col + width]
            q += a.unsqueeze(-1) * c.unsqueeze(-2) * signs[:, col : col + width]
            plane, col = plane + 1, col + width
        if means is not None:
            q += means[g].float().unsqueeze(-1)
        weight[:, sl] = q
    return weight


def _is_binary(params) -> bool:
    return hasattr(params, "mean")


def _bit_positions(col_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b_max, C) stream position of bit j of column c and whether column c has a bit j."""
    offsets = torch.cumsum(col_bits, 0) - col_bits
    planes = torch.arange(int(col_bits.max()))[:, None]
    return offsets[None, :] + planes, planes < col_bits[None, :]


def pack_uniform(
    weight_q: torch.Tensor,
    params: list,
    g_idx: torch.Tensor | None,
    bits: list[int],
    sym: bool,
    group_size: int,
    scale_dtype: torch.dtype,
) -> dict:
    """`weight_q` (R, C) the fake-quantized weight; `params` one grid per group (`UniformParams`,
    or SliM-LLM's binarised `BinaryParams`, scales already rounded to `scale_dtype`); `bits` per
    group; `g_idx` (C,) the group of each column (None: c // group_size)."""
    rows, cols = weight_q.shape
    contiguous = torch.arange(cols) // group_size
    g_idx = contiguous if g_idx is None else g_idx.to(torch.int64).cpu()
    binary = [_is_binary(p) for p in params]
    weight_q = weight_q.float().cpu()
    codes = torch.empty(rows, cols, dtype=torch.int64)
    for g, p in enumerate(params):
        columns = (g_idx == g).nonzero()[:, 0]
        block = weight_q[:, columns]
        if binary[g]:
            codes[:, columns] = (block >= p.mean.cpu().unsqueeze(1)).to(torch.int64)
        else:
            cpu = UniformParams(p.scale.cpu(), p.zero.cpu(), p.maxq)
            codes[:, columns] = cpu.quantize(block).to(torch.int64)
    col_bits = torch.tensor(bits)[g_idx]
    position, valid = _bit_positions(col_bits)
    stream = torch.zeros(rows, int(col_bits.sum()), dtype=torch.bool)
    for j in range(position.shape[0]):  # bit j of every column that has one
        stream[:, position[j, valid[j]]] = ((codes[:, valid[j]] >> j) & 1).bool()
    out = {
        "uq_bits": torch.tensor([0 if b else n for b, n in zip(binary, bits, strict=True)], dtype=torch.int8),
        "uq_codes": pack_bits(stream),
        "uq_scale": torch.stack([p.scale.cpu() for p in params]).to(scale_dtype),
        "weight_shape": torch.tensor([rows, cols], dtype=torch.int32),
    }
    uniform = [(p, n) for p, n, b in zip(params, bits, binary, strict=True) if not b]
    if not sym and uniform:
        zero_bits = [
            ((p.zero.cpu().to(torch.int64).unsqueeze(-1) >> torch.arange(n)) & 1).reshape(-1)
            for p, n in uniform
        ]
        out["uq_zero"] = pack_bits(torch.cat(zero_bits).bool())
    if any(binary):
        out["uq_mean"] = torch.stack([p.mean.cpu() for p, b in zip(params, binary, strict=True) if b]).to(
            scale_dtype
        )
    if not torch.equal(g_idx, contiguous):
        out["uq_g_idx"] = g_idx.to(torch.int32)
    return out


def unpack_uniform(tensors: dict, sym: bool, group_size: int) -> torch.Tensor:
    """Inverse of `pack_uniform` (uq_bits 0 marks a binarised group: 1 code bit, mean + scale)."""
    rows, cols = (int(x) for x in tensors["weight_shape"])
    kinds = tensors["uq_bits"].tolist()
    bits = torch.tensor([max(b, 1) for b in kinds])
    g_idx = tensors.get("uq_g_idx")
    g_idx = (torch.arange(cols) // group_size) if g_idx is None else g_idx.to(torch.int64).cpu()
    if int(g_idx.max()) >= len(kinds) or tensors["uq_scale"].shape != (len(kinds), rows):
        raise PackedFormatError(
            f"packed uniform tensors do not fit weight_shape {rows}x{cols} and group_size {group_size}: "
            f"{len(kinds)} groups in uq_bits, uq_scale {tuple(tensors['uq_scale'].shape)}"
        )
    col_bits = bits[g_idx]
    stream = unpack_bits(tensors["uq_codes"].cpu(), int(col_bits.sum())).to(torch.int64)
    position, valid = _bit_positions(col_bits)
    codes = torch.zeros(rows, cols, dtype=torch.int64)
    for j in range(position.shape[0]):
        codes[:, valid[j]] |= stream[:, position[j, valid[j]]] << j
    codes = codes.float()
    scale = tensors["uq_scale"].float().cpu()  # (G, R)
    offset = torch.zeros(len(kinds), rows)  # zero point per group (uniform) or row mean (binarised)
    zero_bits = None
    if "uq_zero" in tensors:
        zero_bits = unpack_bits(tensors["uq_zero"].cpu(), rows * sum(b for b in kinds if b)).to(torch.int64)
    position_z, binary_index = 0, 0
    for g, b in enumerate(kinds):
        if b == 0:
            offset[g] = tensors["uq_mean"][binary_index].float().cpu()
            binary_index += 1
        elif sym:
            offset[g] = 2**b / 2
        else:
            chunk = zero_bits[position_z : position_z + rows * b].view(rows, b)
            offset[g] = (chunk << torch.arange(b)).sum(-1).float()
            position_z += rows * b
    is_binary = torch.tensor([b == 0 for b in kinds])[g_idx]  # (C,)
    scale_cols, offset_cols = scale[g_idx].T, offset[g_idx].T  # (R, C)
    uniform = scale_cols * (codes - offset_cols)
    binarised = offset_cols + scale_cols * (2 * codes - 1)
    return torch.where(is_binary[None, :], binarised, uniform)


def pack_result(result, quant, shape: tuple[int, int]) -> tuple[ModuleFormat, dict[str, torch.Tensor]]:
    """(format, tensors) of one `quantize_weight(..., return_state=True)` result; `quant` its QuantSpec.
    The method's `pack_kind` names the layout; the format records what the tensors were produced with:
    the result's group size, the scale dtype, and for uniform grids whether the quantizer implied the
    zero point (`state["sym"]`: SliM-LLM fits asymmetric grids whatever `quant.sym` says). Uniform groups
    are stored at their `result.orders`. A state with an `input_scale` s (AWQ) stores the codes of its
    `scaled_weight` Q(W diag(s)) and s itself."""
    kind = get_method(result.method).pack_kind
    if kind == "bcq":
        fmt = ModuleFormat(kind, result.group_size, quant.scale_dtype)
        return fmt, pack_daq(result.state["codes"], shape, quant.torch_scale_dtype)
    if kind == "uniform":
        params, sym = result.state["params"], result.state["sym"]
        input_scale = result.state.get("input_scale")
        fmt = ModuleFormat(kind, result.group_size, quant.scale_dtype, sym, input_scale is not None)
        weight_q = result.weight if input_scale is None else result.state["scaled_weight"]
        tensors = pack_uniform(
            weight_q.float(),
            params,
            result.state.get("g_idx"),
            result.orders.tolist(),
            sym,
            result.group_size,
            quant.torch_scale_dtype,
        )
        if input_scale is not None:
            tensors[INPUT_SCALE_KEY] = input_scale.cpu().to(quant.torch_scale_dtype)
        return fmt, tensors
    raise PackedFormatError(f"quant.method={result.method!r} has no packed format; run without pipeline.pack")
