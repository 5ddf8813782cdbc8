"""`quantize_weight`: the one entry point that quantizes a Linear weight given its input statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from qdllm.quant import accounting, slim
from qdllm.quant.abmp import allocate_orders, group_scores
from qdllm.quant.compensation import quantize_sequential
from qdllm.quant.daq import BinaryCode, daq_quantize
from qdllm.quant.gptq import gptq_quantize
from qdllm.quant.groups import group_sizes, group_slices
from qdllm.quant.hessian import HessianFactors, factorize, repair_dead_channels
from qdllm.quant.importance import importance, loss_weights, outlier_mask
from qdllm.quant.spec import QuantConfigError, QuantSpec
from qdllm.quant.uniform import find_params

DEFAULT_COMPENSATION = {"rtn": "off", "daq": "diag"}


class QuantInputError(ValueError):
    """The weight, the second moment or an order map given to `quantize_weight` is unusable."""


@dataclass
class QuantResult:
    """Outcome of quantizing one Linear weight W (R x C).

    Attributes:
        weight: (R, C) dequantized weight, dtype and device of the input.
        orders: (G,) int64 per-group DAQ order, or bit width for uniform methods.
        bits_per_weight: storage bits per weight counting signs/codes, every scale, zero points
            and the per-group order byte (see `accounting`).
        weight_error: ||W - Q||_F / ||W||_F.
        proxy_error: Tr(dW S dW^T) / Tr(W S W^T), or None without S.
        seconds: wall time (synchronised on CUDA).
        group_size: columns per group.
        dead_channels: inputs with S_jj = 0 (their weight columns are zeroed).
        damp: absolute damping that made S + eps I positive definite (None without S).
        outlier_fraction: share of DOR outliers (DAQ with DOR), else None.
        state: method-specific codes for packing (only with ``return_state=True``).
    """

    weight: torch.Tensor
    orders: torch.Tensor
    bits_per_weight: float
    weight_error: float
    proxy_error: float | None
    seconds: float
    method: str
    group_size: int
    dead_channels: int = 0
    damp: float | None = None
    outlier_fraction: float | None = None
    state: dict[str, Any] | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """Scalars for tables and logs."""
        hist = torch.bincount(self.orders).tolist()
        return {
            "method": self.method,
            "bits_per_weight": self.bits_per_weight,
            "weight_error": self.weight_error,
            "proxy_error": self.proxy_error,
            "seconds": self.seconds,
            "orders_hist": {k: n for k, n in enumerate(hist) if n},
            "dead_channels": self.dead_channels,
            "damp": self.damp,
            "outlier_fraction": self.outlier_fraction,
        }


def quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    cfg: Any,
    *,
    orders: torch.Tensor | None = None,
    cross_moment: torch.Tensor | None = None,
    inputs: torch.Tensor | None = None,
    return_state: bool = False,
) -> QuantResult:
    """Quantize one weight matrix.

    Args:
        weight: (R, C) = (out_features, in_features), any float dtype, CPU or CUDA.
        hessian: (C, C) input second moment S = X^T X / N (fp32 recommended); may be None only for
            ``rtn`` and ``none``.
        cfg: the resolved ``quant`` node, a dict with the same keys, or a `QuantSpec`.
        orders: optional (G,) precomputed DAQ orders (ABMP with block scope is decided across
            Linears by the caller); overrides ``abmp_ratio``.
        cross_moment: (C, C) D = (X - X~)^T X~ / N for ``gptaq``: X the inputs of this Linear in
            the FP model, X~ in the partially quantized model (`hessian` is built from X~).
        inputs: (n, C) calibration inputs of this Linear for ``slim`` (its KL choice of how many
            groups move to bits-1 / bits+1).
        return_state: also return the codes and scales needed by the packed format.
    """
    spec = QuantSpec.from_any(cfg)
    _check_inputs(weight, hessian, spec, orders)
    if spec.method == "slim" and (inputs is None or inputs.dim() != 2 or inputs.shape[1] != weight.shape[1]):
        raise QuantInputError(
            f"quant.method='slim' needs inputs (n, {weight.shape[1]}): calibration inputs of this Linear "
            "for the KL choice of the bit allocation; the pipeline supplies them"
        )
    if spec.method == "gptaq" and (cross_moment is None or cross_moment.shape != hessian.shape):
        raise QuantInputError(
            "quant.method='gptaq' needs cross_moment (C, C) = (X_fp - X_q)^T X_q / N beside the hessian; "
            "the pipeline supplies it from the FP and quantized input streams"
        )
    device = weight.device
    _sync(device)
    start = time.perf_counter()

    w = weight.detach().to(torch.float32)
    n_rows, n_cols = w.shape
    gsize = spec.effective_group_size(n_cols)
    slices = group_slices(n_cols, gsize)
    widths = [sl.stop - sl.start for sl in slices]
    s = None if hessian is None else hessian.detach().to(device=device, dtype=torch.float32)
    dead_count, damp, outlier_fraction, state = 0, None, None, None
    if s is not None:
        s, dead = repair_dead_channels(s)
        dead_count = int(dead.sum())
        if dead_count:
            w = w.clone()
            w[:, dead] = 0.0
    compensation = _compensation(spec)

    if spec.method == "none":
        q = weight.detach().to(torch.float32)
        group_orders = torch.full((len(slices),), torch.finfo(weight.dtype).bits, dtype=torch.int64)
        total_bits = n_rows * n_cols * torch.finfo(weight.dtype).bits
    elif spec.method == "slim":
        q, group_orders, damp, params = _slim(w, s, gsize, spec, inputs)
        total_bits = accounting.slim_bits(n_rows, widths, group_orders.tolist(), spec.scale_bits)
        if return_state:  # SQC and binarised grids are asymmetric whatever quant.sym says
            state = {"params": params, "sym": False}
    elif spec.method in ("gptq", "gptaq"):
        cross = None
        if spec.method == "gptaq":
            cross = cross_moment.detach().to(device=device, dtype=torch.float32)
            if dead_count:  # a dead channel of X~ contributes nothing to H nor to D
                cross = cross.clone()
                cross[:, dead] = 0.0
        out = gptq_quantize(
            w,
            s,
            bits=spec.bits,
            sym=spec.sym,
            group_size=gsize,
            block_size=spec.block_size,
            act_order=spec.act_order,
            static_groups=spec.static_groups,
            damp=spec.damp,
            damp_max_tries=spec.damp_max_tries,
            scale_dtype=spec.torch_scale_dtype,
            cross_moment=cross,
            alpha=spec.gptaq_alpha,
        )
        q, damp = out.weight, out.damp
        group_orders = torch.full((len(out.params),), spec.bits, dtype=torch.int64)
        group_widths = torch.bincount(out.g_idx, minlength=len(out.params)).tolist()
        total_bits = accounting.uniform_bits(
            n_rows, group_widths, group_orders.tolist(), spec.sym, spec.scale_bits
        )
        if return_state:
            state = {"params": out.params, "g_idx": out.g_idx, "sym": spec.sym}
    else:
        factors = None
        if s is not None and (compensation != "off" or spec.method == "daq"):
            factors = factorize(s, spec.damp, spec.damp_max_tries)
            damp = factors.damp
        if spec.method == "rtn":
            q, group_orders, params = _rtn(w, slices, spec, factors, compensation)
            total_bits = accounting.uniform_bits(
                n_rows, widths, group_orders.tolist(), spec.sym, spec.scale_bits
            )
            if return_state:
                state = {"params": params, "sym": spec.sym}
        else:
            q, group_orders, codes, outlier_fraction = _daq(w, slices, spec, factors, compensation, orders)
            total_bits = accounting.daq_bits(
                n_rows, widths, group_orders.tolist(), spec.scale_bits, spec.row_center
            )
            if return_state:
                state = {"codes": codes}

    deq = q.to(weight.dtype)
    weight_error, proxy_error = _errors(weight, deq, s)
    _sync(device)
    return QuantResult(
        weight=deq,
        orders=group_orders.to("cpu", torch.int64),
        bits_per_weight=total_bits / (n_rows * n_cols),
        weight_error=weight_error,
        proxy_error=proxy_error,
        seconds=time.perf_counter() - start,
        method=spec.method,
        group_size=gsize,
        dead_channels=dead_count,
        damp=damp,
        outlier_fraction=outlier_fraction,
        state=state,
    )


def daq_orders(
    weight: torch.Tensor, factors: HessianFactors | None, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance Z (R, C) and the matrix-scope ABMP order map (G,) of one Linear."""
    z = importance(weight, factors, spec.z_mode)
    gsize = spec.effective_group_size(weight.shape[1])
    sizes = group_sizes(*weight.shape, gsize)
    (orders,) = allocate_orders([group_scores(z, gsize)], [sizes], spec.abmp_ratio, spec.order)
    return z, orders


def _daq(
    w: torch.Tensor,
    slices: list[slice],
    spec: QuantSpec,
    factors: HessianFactors | None,
    compensation: str,
    orders: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, list[BinaryCode], float | None]:
    z, abmp = daq_orders(w, factors, spec)
    if orders is None:
        orders = abmp
    use_dor = spec.dor and spec.rsr and spec.lam > 1.0
    lam2, outlier_fraction = None, None
    if use_dor:
        mask = outlier_mask(z, spec.effective_group_size(w.shape[1]), spec.dor_scope, spec.dor_k_sigma)
        outlier_fraction = float(mask.float().mean())
        lam2 = loss_weights(mask, spec.lam)
    iters = spec.iters if spec.rsr else 0
    order_list = [int(k) for k in orders.tolist()]

    def run(units: torch.Tensor, weights: torch.Tensor | None, order: int) -> BinaryCode:
        return daq_quantize(units, order, weights, iters, spec.eps, spec.row_center, spec.torch_scale_dtype)

    codes: list[BinaryCode | None] = [None] * len(slices)
    if compensation == "off":
        q = torch.empty_like(w)
        buckets: dict[tuple[int, int], list[int]] = {}
        for index, cols in enumerate(slices):
            buckets.setdefault((cols.stop - cols.start, order_list[index]), []).append(index)
        per_batch = max(1, spec.batch_elements // (w.shape[0] * spec.effective_group_size(w.shape[1])))
        batches = [
            (order, members[start : start + per_batch])
            for (_, order), members in buckets.items()
            for start in range(0, len(members), per_batch)
        ]
        for order, members in batches:
            units = torch.stack([w[:, slices[i]] for i in members])
            weights = None if lam2 is None else torch.stack([lam2[:, slices[i]] for i in members])
            code = run(units, weights, order)
            deq = code.dequantize()
            for pos, i in enumerate(members):
                q[:, slices[i]] = deq[pos]
                codes[i] = _select(code, pos)
    else:

        def quantize_block(block: torch.Tensor, index: int) -> torch.Tensor:
            weights = None if lam2 is None else lam2[:, slices[index]].unsqueeze(0)
            code = run(block.unsqueeze(0), weights, order_list[index])
            codes[index] = code
            return code.dequantize()[0]

        q = quantize_sequential(w, slices, quantize_block, factors.upper, compensation)
    return q, orders.to(torch.int64), codes, outlier_fraction


def _rtn(
    w: torch.Tensor,
    slices: list[slice],
    spec: QuantSpec,
    factors: HessianFactors | None,
    compensation: str,
) -> tuple[torch.Tensor, torch.Tensor, list]:
    params: list = [None] * len(slices)

    def quantize_block(block: torch.Tensor, index: int) -> torch.Tensor:
        grid = find_params(block, spec.bits, spec.sym, spec.torch_scale_dtype)
        params[index] = grid
        return grid.fake_quantize(block)

    upper = None if factors is None else factors.upper
    q = quantize_sequential(w, slices, quantize_block, upper, compensation)
    return q, torch.full((len(slices),), spec.bits, dtype=torch.int64), params


def _select(code: BinaryCode, pos: int) -> BinaryCode:
    """The code of one unit of a batch, keeping a G axis of length 1."""
    sl = slice(pos, pos + 1)
    return BinaryCode(
        code.row_scales[:, sl],
        code.col_scales[:, sl],
        code.signs[:, sl],
        None if code.row_mean is None else code.row_mean[sl],
    )


def _slim(w: torch.Tensor, s: torch.Tensor, gsize: int, spec: QuantSpec, inputs: torch.Tensor):
    """SliM-LLM: SBA bit allocation (KL-chosen k), then GPTQ with SQC / binarised group grids."""
    diag = factorize(s, spec.damp, spec.damp_max_tries).upper.diagonal()
    salience = slim.group_salience(w, diag, gsize)
    x = inputs.detach().to(device=w.device, dtype=torch.float32)
    k = slim.choose_k(w, salience, spec.bits, gsize, x, spec.torch_scale_dtype)
    alloc = slim.allocate_bits(salience, k, spec.bits)

    def fit_group(window: torch.Tensor, first: int):
        window_salience = slim.element_salience(window, diag[first : first + window.shape[1]])
        bits = int(alloc[first // gsize])
        return slim.fit(window, bits, window_salience, spec.slim_lambda, spec.torch_scale_dtype)

    out = gptq_quantize(
        w,
        s,
        bits=spec.bits,
        sym=False,
        group_size=gsize,
        block_size=spec.block_size,
        act_order=False,
        static_groups=False,
        damp=spec.damp,
        damp_max_tries=spec.damp_max_tries,
        scale_dtype=spec.torch_scale_dtype,
        fit_group=fit_group,
    )
    return out.weight, alloc.to(torch.int64), out.damp, out.params


def _compensation(spec: QuantSpec) -> str:
    if spec.method in ("gptq", "gptaq", "slim"):
        if spec.compensation not in ("auto", "off"):
            raise QuantConfigError(
                f"quant.compensation={spec.compensation!r}: GPTQ compensates column by column "
                "by construction; leave quant.compensation=auto"
            )
        return "auto"
    if spec.compensation == "auto":
        return DEFAULT_COMPENSATION.get(spec.method, "off")
    return spec.compensation


def _errors(weight: torch.Tensor, deq: torch.Tensor, s: torch.Tensor | None) -> tuple[float, float | None]:
    w = weight.detach().to(torch.float32)
    delta = w - deq.to(torch.float32)
    weight_error = float(delta.norm() / w.norm().clamp_min(1e-30))
    if s is None:
        return weight_error, None
    num = ((delta @ s) * delta).sum()
    den = ((w @ s) * w).sum()
    return weight_error, float(num / den.clamp_min(1e-30))


def _check_inputs(
    weight: torch.Tensor, hessian: torch.Tensor | None, spec: QuantSpec, orders: torch.Tensor | None
) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise QuantInputError("weight must be a 2-D tensor of shape (out_features, in_features)")
    if not weight.is_floating_point():
        raise QuantInputError(f"weight must be floating point, got {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise QuantInputError(f"weight has {bad} NaN/Inf entries; fix the checkpoint before quantizing")
    n_cols = weight.shape[1]
    if hessian is None:
        if spec.method not in ("rtn", "none") or _compensation(spec) not in ("off", "auto"):
            raise QuantInputError(
                f"quant.method={spec.method!r} needs the input second moment (hessian); "
                "only rtn without compensation runs data-free"
            )
    else:
        if hessian.shape != (n_cols, n_cols):
            raise QuantInputError(
                f"hessian shape {tuple(hessian.shape)} does not match weight in_features {n_cols}; "
                f"expected ({n_cols}, {n_cols})"
            )
        if not bool(torch.isfinite(hessian).all()):
            raise QuantInputError("hessian (input second moment) has NaN/Inf entries")
    gsize = spec.effective_group_size(n_cols)
    if spec.require_full_groups and n_cols % gsize:
        raise QuantInputError(
            f"in_features={n_cols} is not a multiple of quant.group_size={gsize} and "
            "quant.require_full_groups is set; pick a divisor of in_features"
        )
    if orders is not None:
        n_groups = len(group_slices(n_cols, gsize))
        if spec.method != "daq":
            raise QuantInputError("an explicit order map is only meaningful for method=daq")
        if orders.shape != (n_groups,) or int(orders.min()) < 1:
            raise QuantInputError(
                f"orders must be a ({n_groups},) tensor of ints >= 1, got shape {tuple(orders.shape)}"
            )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
