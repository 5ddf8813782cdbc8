"""`quantize_weight`: the one entry point that quantizes a Linear weight given its input statistics.

It checks the inputs, prepares a `LinearProblem` (fp32 weight, column groups, statistics with dead
input channels handled), lets the method of `quant.method` (`qdllm.quant.methods`) quantize it and
reports the errors and the storage cost of the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from qdllm.quant.errors import QuantInputError
from qdllm.quant.groups import group_slices
from qdllm.quant.hessian import repair_dead_channels
from qdllm.quant.methods import LinearProblem, MethodOutput, QuantMethod, get_method
from qdllm.quant.spec import QuantSpec

__all__ = ["QuantInputError", "QuantResult", "quantize_weight"]


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
    method = get_method(spec.method)
    _check_inputs(weight, hessian, spec, method, orders)
    method.check_statistics(weight.shape[1], cross_moment, inputs)
    _sync(weight.device)
    start = time.perf_counter()
    problem, dead = _problem(weight, hessian, spec, method, orders, cross_moment, inputs)
    out = method.quantize(problem, spec)
    deq = out.weight.to(weight.dtype)
    weight_error, proxy_error = _errors(weight, deq, _given_moment(problem.hessian, dead))
    _sync(weight.device)
    return QuantResult(
        weight=deq,
        orders=out.orders.to("cpu", torch.int64),
        bits_per_weight=_bits_per_weight(method, out, spec, weight.shape),
        weight_error=weight_error,
        proxy_error=proxy_error,
        seconds=time.perf_counter() - start,
        method=spec.method,
        group_size=problem.group_size,
        dead_channels=0 if dead is None else int(dead.sum()),
        damp=out.damp,
        outlier_fraction=out.outlier_fraction,
        state=out.state if return_state else None,
    )


def _problem(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    spec: QuantSpec,
    method: QuantMethod,
    orders: torch.Tensor | None,
    cross_moment: torch.Tensor | None,
    inputs: torch.Tensor | None,
) -> tuple[LinearProblem, torch.Tensor | None]:
    """The method's view of one Linear (fp32, on the weight's device) and the (C,) bool dead
    input channels (S_jj = 0; None without S): nothing reaches their weight columns, so a method
    that quantizes zeroes them, and they add nothing to D."""
    device = weight.device
    w = weight.detach().to(torch.float32)
    gsize = spec.effective_group_size(w.shape[1])
    s, dead = None, None
    if hessian is not None:
        s, dead = repair_dead_channels(hessian.detach().to(device=device, dtype=torch.float32))
    has_dead = dead is not None and bool(dead.any())
    if has_dead and method.quantizes:
        w = w.clone()
        w[:, dead] = 0.0
    cross = None
    if method.needs_cross_moment:
        cross = cross_moment.detach().to(device=device, dtype=torch.float32)
        if has_dead:
            cross = cross.clone()
            cross[:, dead] = 0.0
    x = inputs.detach().to(device=device, dtype=torch.float32) if method.needs_inputs else None
    problem = LinearProblem(w, weight.dtype, group_slices(w.shape[1], gsize), gsize, s, cross, x, orders)
    return problem, dead


def _given_moment(s: torch.Tensor | None, dead: torch.Tensor | None) -> torch.Tensor | None:
    """S as given (symmetrised, fp32): the dead-channel repair S_jj = 1 undone, so that a dead
    channel adds nothing to the proxy Tr(dW S dW^T), as its definition on the given S says."""
    if s is None or not bool(dead.any()):
        return s
    s = s.clone()
    index = torch.nonzero(dead).squeeze(1)
    s[index, index] = 0.0
    return s


def _bits_per_weight(method: QuantMethod, out: MethodOutput, spec: QuantSpec, shape: torch.Size) -> float:
    rows, cols = shape
    return method.storage_bits(rows, out.group_widths, out.orders.tolist(), spec) / (rows * cols)


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
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    spec: QuantSpec,
    method: QuantMethod,
    orders: torch.Tensor | None,
) -> None:
    _check_weight(weight)
    n_cols = weight.shape[1]
    _check_hessian(hessian, n_cols, spec, method)
    gsize = spec.effective_group_size(n_cols)
    if spec.require_full_groups and n_cols % gsize:
        raise QuantInputError(
            f"in_features={n_cols} is not a multiple of quant.group_size={gsize} and "
            "quant.require_full_groups is set; pick a divisor of in_features"
        )
    if orders is not None:
        _check_orders(orders, len(group_slices(n_cols, gsize)), method)


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise QuantInputError("weight must be a 2-D tensor of shape (out_features, in_features)")
    if not weight.is_floating_point():
        raise QuantInputError(f"weight must be floating point, got {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise QuantInputError(f"weight has {bad} NaN/Inf entries; fix the checkpoint before quantizing")


def _check_hessian(hessian: torch.Tensor | None, n_cols: int, spec: QuantSpec, method: QuantMethod) -> None:
    if hessian is None:
        if method.needs_hessian(spec):
            raise QuantInputError(
                f"quant.method={spec.method!r} needs the input second moment (hessian); "
                "only rtn without compensation runs data-free"
            )
        return
    if hessian.shape != (n_cols, n_cols):
        raise QuantInputError(
            f"hessian shape {tuple(hessian.shape)} does not match weight in_features {n_cols}; "
            f"expected ({n_cols}, {n_cols})"
        )
    if not bool(torch.isfinite(hessian).all()):
        raise QuantInputError("hessian (input second moment) has NaN/Inf entries")


def _check_orders(orders: torch.Tensor, n_groups: int, method: QuantMethod) -> None:
    if not method.supports_abmp:
        raise QuantInputError(
            f"an explicit order map needs a method with ABMP, not quant.method={method.name!r}"
        )
    if orders.shape != (n_groups,) or int(orders.min()) < 1:
        raise QuantInputError(
            f"orders must be a ({n_groups},) tensor of ints >= 1, got shape {tuple(orders.shape)}"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
