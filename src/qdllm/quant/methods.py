"""One object per quantization method: the statistics it needs, its rules, its quantizer, its cost.

`get_method(quant.method)` is the only place a method name is looked up. A new method is one
`QuantMethod` subclass here, listed in `METHODS`, plus its `conf/quant/<name>.yaml`.

Every method quantizes a `LinearProblem` (one Linear weight W (R, C) in G column groups, with its
input statistics) into a `MethodOutput`; `quantize_weight` prepares the problem and reports the
errors, so a method holds only what differs between methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from qdllm.quant import accounting, slim
from qdllm.quant.abmp import allocate_orders, group_scores
from qdllm.quant.awq import awq_quantize, clip_ratios
from qdllm.quant.compensation import quantize_sequential
from qdllm.quant.daq import BinaryCode, daq_quantize
from qdllm.quant.errors import QuantConfigError, QuantInputError, check_field
from qdllm.quant.gptq import gptq_quantize
from qdllm.quant.groups import group_sizes
from qdllm.quant.hessian import HessianFactors, factorize
from qdllm.quant.importance import importance, loss_weights, outlier_mask
from qdllm.quant.uniform import find_params

if TYPE_CHECKING:
    from qdllm.quant.spec import QuantSpec


@dataclass
class LinearProblem:
    """One Linear weight and its statistics, as `quantize_weight` hands them to a method.

    Attributes:
        weight: (R, C) fp32 weight; the columns of dead input channels are zeroed for every method
            that quantizes (nothing reaches them).
        source_dtype: dtype of the weight as given (its storage width under ``none``).
        slices: the G column groups, `group_size` columns each (the last may be ragged).
        group_size: columns per group.
        hessian: (C, C) fp32 second moment S = X^T X / N with dead channels repaired (S_jj = 1), or
            None when the method runs data-free.
        cross_moment: (C, C) fp32 GPTAQ's D = (X - X~)^T X~ / N, dead columns zeroed, or None.
        inputs: (n, C) fp32 calibration inputs of this Linear (SliM-LLM, AWQ), or None.
        orders: (G,) explicit DAQ order map (block-scope ABMP), or None.
    """

    weight: torch.Tensor
    source_dtype: torch.dtype
    slices: list[slice]
    group_size: int
    hessian: torch.Tensor | None = None
    cross_moment: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    orders: torch.Tensor | None = None

    @property
    def widths(self) -> list[int]:
        return [sl.stop - sl.start for sl in self.slices]


@dataclass
class MethodOutput:
    """What a method returns for one Linear.

    Attributes:
        weight: (R, C) fp32 dequantized weight.
        orders: (G,) int64 DAQ order or bit width of every stored group.
        group_widths: (G,) columns of every stored group (GPTQ's act-order groups need not be the
            contiguous slices).
        damp: absolute damping that made S + eps I positive definite, or None.
        outlier_fraction: share of DOR outliers (DAQ with DOR), or None.
        state: the codes or grids the packed format stores.
    """

    weight: torch.Tensor
    orders: torch.Tensor
    group_widths: list[int]
    damp: float | None = None
    outlier_fraction: float | None = None
    state: dict[str, Any] = field(default_factory=dict)


class QuantMethod:
    """A quantization method. Subclasses set the class attributes and implement `quantize`.

    Attributes:
        name: the value of `quant.method`.
        quantizes: False for the identity: the pipeline leaves the model as loaded.
        needs_cross_moment: needs GPTAQ's D from a second, full-precision input stream.
        needs_inputs: needs a sample of the raw calibration inputs of each Linear.
        supports_abmp: reads `abmp_ratio` / `abmp_scope` (paper Alg. 3); other methods keep one
            width for every group whatever the ABMP setting.
        default_compensation: what `compensation=auto` means (cross-group error compensation).
        pack_kind: the packed format (`qdllm.packing.linear`: bcq | uniform), None for no format.
    """

    name: ClassVar[str]
    quantizes: ClassVar[bool] = True
    needs_cross_moment: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = False
    supports_abmp: ClassVar[bool] = False
    default_compensation: ClassVar[str] = "off"
    pack_kind: ClassVar[str | None] = None

    def needs_hessian(self, spec: QuantSpec) -> bool:
        """Whether the input second moment S is required (else the method may run data-free)."""
        return True

    def validate(self, spec: QuantSpec) -> None:
        """Raise `QuantConfigError` for settings this method cannot honour."""

    def check_statistics(self, n_cols: int, cross_moment: torch.Tensor | None, inputs: torch.Tensor | None):
        """Raise `QuantInputError` when a statistic this method needs is missing or misshapen."""

    def input_rows(self, spec: QuantSpec) -> int:
        """How many raw calibration input rows of each Linear a `needs_inputs` method reads."""
        raise NotImplementedError(f"quant.method={self.name!r} reads no raw calibration inputs")

    def compensation(self, spec: QuantSpec) -> str:
        """The cross-group compensation mode that runs: off | diag | exact."""
        return self.default_compensation if spec.compensation == "auto" else spec.compensation

    def quantize(self, problem: LinearProblem, spec: QuantSpec) -> MethodOutput:
        raise NotImplementedError

    def storage_bits(self, rows: int, widths: list[int], orders: list[int], spec: QuantSpec) -> int:
        """Bits stored for the Linear: rows x widths[g] weights at orders[g] per group."""
        raise NotImplementedError


class Identity(QuantMethod):
    """``none``: the weight as given, stored at its own width."""

    name = "none"
    quantizes = False

    def needs_hessian(self, spec: QuantSpec) -> bool:
        return False

    def quantize(self, problem: LinearProblem, spec: QuantSpec) -> MethodOutput:
        width = torch.finfo(problem.source_dtype).bits
        orders = torch.full((len(problem.slices),), width, dtype=torch.int64)
        return MethodOutput(problem.weight, orders, problem.widths)

    def storage_bits(self, rows: int, widths: list[int], orders: list[int], spec: QuantSpec) -> int:
        return sum(rows * w * k for w, k in zip(widths, orders, strict=True))


class RoundToNearest(QuantMethod):
    """``rtn``: min-max uniform grid per group and row, optionally with cross-group compensation."""

    name = "rtn"
    pack_kind = "uniform"

    def needs_hessian(self, spec: QuantSpec) -> bool:
        return self.compensation(spec) != "off"

    def quantize(self, problem: LinearProblem, spec: QuantSpec) -> MethodOutput:
        compensation = self.compensation(spec)
        factors = None
        if problem.hessian is not None and compensation != "off":
            factors = factorize(problem.hessian, spec.damp, spec.damp_max_tries)
        params: list = [None] * len(problem.slices)

        def quantize_block(block: torch.Tensor, index: int) -> torch.Tensor:
            grid = find_params(block, spec.bits, spec.sym, spec.torch_scale_dtype)
            params[index] = grid
            return grid.fake_quantize(block)

        upper = None if factors is None else factors.upper
        q = quantize_sequential(problem.weight, problem.slices, quantize_block, upper, compensation)
        orders = torch.full((len(problem.slices),), spec.bits, dtype=torch.int64)
        damp = None if factors is None else factors.damp
        return MethodOutput(q, orders, problem.widths, damp=damp, state={"params": params, "sym": spec.sym})

    def storage_bits(self, rows: int, widths: list[int], orders: list[int], spec: QuantSpec) -> int:
        return accounting.uniform_bits(rows, widths, orders, spec.sym, spec.scale_bits)


def _refuse_compensation(spec: QuantSpec, reason: str) -> None:
    """Methods with no cross-group compensation of their own choosing accept only auto / off."""
    check_field(
        spec.compensation in ("auto", "off"), spec, "compensation", f"{reason}; leave quant.compensation=auto"
    )


class _ColumnWise(QuantMethod):
    """GPTQ-style methods: OBQ updates column by column are their compensation, built in."""

    pack_kind = "uniform"

    def validate(self, spec: QuantSpec) -> None:
        _refuse_compensation(spec, f"{self.name} compensates column by column by construction")


class GPTQ(_ColumnWise):
    """``gptq`` (Frantar et al. 2023): column-wise OBQ with lazy blocks, uniform grids."""

    name = "gptq"

    def validate(self, spec: QuantSpec) -> None:
        super().validate(spec)
        if spec.static_groups:
            check_field(spec.group_size != -1, spec, "static_groups", "needs a finite group_size")

    def quantize(self, problem: LinearProblem, spec: QuantSpec) -> MethodOutput:
        out = gptq_quantize(
            problem.weight,
            problem.hessian,
            bits=spec.bits,
            sym=spec.sym,
            group_size=problem.group_size,
            block_size=spec.block_size,
            act_order=spec.act_order,
            static_groups=spec.static_groups,
            damp=spec.damp,
            damp_max_tries=spec.damp_max_tries,
            scale_dtype=spec.torch_scale_dtype,
            cross_moment=problem.cross_moment,
            alpha=spec.gptaq_alpha,
        )
        orders = torch.full((len(out.params),), spec.bits, dtype=torch.int64)
        widths = torch.bincount(out.g_idx, minlength=len(out.params)).tolist()
        return MethodOutput(
            out.weight,
            orders,
            widths,
            damp=out.damp,
            state={"params": out.params, "g_idx": out.g_idx, "sym": spec.sym},
        )

    def storage_bits(self, rows: int, widths: list[int], orders: list[int], spec: QuantSpec) -> int:
        return accounting.uniform_bits(rows, widths, orders, spec.sym, spec.scale_bits)


class GPTAQ(GPTQ):
    """``gptaq`` (Li et al. 2025): GPTQ fitted to the FP model's output on FP inputs (needs D)."""

    name = "gptaq"
    needs_cross_moment = True

    def check_statistics(self, n_cols: int, cross_moment: torch.Tensor | None, inputs: torch.Tensor | None):
        if cross_moment is None or cross_moment.shape != (n_cols, n_cols):
            raise QuantInputError(
                f"quant.method='gptaq' needs cross_moment ({n_cols}, {n_cols}) = (X_fp - X_q)^T X_q / N "
                "beside the hessian; the pipeline supplies it from the FP and quantized input streams"
            )


class SliM(_ColumnWise):
    """``slim`` (SliM-LLM, Huang et al. 2024): salience-driven group bits (bits-1 / bits / bits+1,
    the count chosen by the output KL on the raw inputs), SQC grids, then GPTQ inside the groups."""

    name = "slim"
    needs_inputs = True

    def validate(self, spec: QuantSpec) -> None:
        super().validate(spec)
        check_field(spec.bits >= 2, spec, "bits", "SliM-LLM moves groups to bits-1, so it needs bits >= 2")
        check_field(not spec.act_order, spec, "act_order", "SliM-LLM keeps the natural column order (groups)")
        check_field(not spec.static_groups, spec, "static_groups", "SliM-LLM fits each group when it starts")

    def check_statistics(self, n_cols: int, cross_moment: torch.Tensor | None, inputs: torch.Tensor | None):
        _check_inputs(self.name, n_cols, inputs, "for the KL choice of the bit allocation")

    def input_rows(self, spec: QuantSpec) -> int:
        return spec.slim_kl_tokens

    def quantize(self, problem: LinearProblem, spec: QuantSpec) -> MethodOutput:
        w, s, gsize = problem.weight, problem.hessian, problem.group_size
        diag = factorize(s, spec.damp, spec.damp_max_tries).upper.diagonal()
        salience = slim.group_salience(w, diag, gsize)
        k = slim.choose_k(w, salience, spec.bits, gsize, problem.inputs, spec.torch_scale_dtype)
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
        orders = alloc.to(torch.int64)
        # SQC and binarised grids are asymmetric whatever quant.sym says
        state = {"params": out.params, "sym": False}
        return MethodOutput(out.weight, orders, problem.widths, damp=out.damp, state=state)

    def storage_bits(self, rows: int, widths: list[int], orders: list[int], spec: QuantSpec) -> int:
        return accounting.slim_bits(rows, widths, orders, spec.scale_bits)


class DAQ(QuantMethod):
    """``daq``: Quant-dLLM's data-aware any-order binary-coded quantizer (paper eq. 3-10, Alg. 2),
    K = `bits` sign planes per group, mixed K-1 / K / K+1 under ABMP (Alg. 3)."""

    name = "daq"
    supports_abmp = True
    default_compensation = "diag"
    pack_kind = "bcq"

    def validate(self, spec: QuantSpec) -> None:
        if spec.abmp_ratio > 0:
            check_field(
                spec.order >= 2, spec, "order", "ABMP moves groups to order K-1, so it needs order >= 2"
            )

    def quantize(self, problem: LinearProblem, spec: QuantSpec) -> MethodOutput:
        w = problem.weight
        factors = factorize(problem.hessian, spec.damp, spec.damp_max_tries)
        z, abmp = daq_orders(w, factors, spec)
        orders = abmp if problem.orders is None else problem.orders
        lam2, outlier_fraction = None, None
        if spec.dor and spec.rsr and spec.lam > 1.0:
            mask = outlier_mask(z, problem.group_size, spec.dor_scope, spec.dor_k_sigma)
            outlier_fraction = float(mask.float().mean())
            lam2 = loss_weights(mask, spec.lam)
        order_list = [int(k) for k in orders.tolist()]
        compensation = self.compensation(spec)
        if compensation == "off":
            q, codes = _daq_batched(problem, spec, order_list, lam2)
        else:
            q, codes = _daq_sequential(problem, spec, order_list, lam2, factors, compensation)
        return MethodOutput(
            q,
            orders.to(torch.int64),
            problem.widths,
            damp=factors.damp,
            outlier_fraction=outlier_fraction,
            state={"codes": codes},
        )

    def storage_bits(self, rows: int, widths: list[int], orders: list[int], spec: QuantSpec) -> int:
        return accounting.daq_bits(rows, widths, orders, spec.scale_bits, spec.row_center)


class AWQ(QuantMethod):
    """``awq`` (Lin et al. 2024): per-input-channel scales s = mean|x|^alpha searched on the Linear's
    output error, AWQ's clipping search, min-max RTN of W diag(s); s is kept as an input scale of
    the Linear (W_hat = Q(W diag(s)) diag(s)^-1), one s per Linear (not shared by the Linears that
    read the same input: nothing is folded into the preceding norm)."""

    name = "awq"
    needs_inputs = True
    pack_kind = "uniform"

    def validate(self, spec: QuantSpec) -> None:
        _refuse_compensation(spec, "AWQ quantizes every group by itself (its searches score the plain grid)")

    def check_statistics(self, n_cols: int, cross_moment: torch.Tensor | None, inputs: torch.Tensor | None):
        _check_inputs(self.name, n_cols, inputs, "for the activation scale mean |x|")

    def input_rows(self, spec: QuantSpec) -> int:
        return spec.awq_max_rows

    def quantize(self, problem: LinearProblem, spec: QuantSpec) -> MethodOutput:
        out = awq_quantize(
            problem.weight,
            problem.inputs,
            problem.hessian,
            problem.group_size,
            spec.bits,
            spec.sym,
            spec.torch_scale_dtype,
            spec.awq_alpha_grid,
            clip_ratios(spec.awq_clip_grid, spec.awq_clip_max_shrink),
        )
        orders = torch.full((len(problem.slices),), spec.bits, dtype=torch.int64)
        state = {
            "params": out.params,
            "sym": spec.sym,
            "input_scale": out.input_scale,
            "scaled_weight": out.scaled_weight,  # the packed codes store Q(W diag(s))
        }
        return MethodOutput(out.weight, orders, problem.widths, state=state)

    def storage_bits(self, rows: int, widths: list[int], orders: list[int], spec: QuantSpec) -> int:
        grids = accounting.uniform_bits(rows, widths, orders, spec.sym, spec.scale_bits)
        return grids + accounting.input_scale_bits(sum(widths), spec.scale_bits)


def _check_inputs(name: str, n_cols: int, inputs: torch.Tensor | None, purpose: str) -> None:
    if inputs is None or inputs.dim() != 2 or inputs.shape[1] != n_cols or inputs.shape[0] == 0:
        raise QuantInputError(
            f"quant.method={name!r} needs inputs (n, {n_cols}), n >= 1: calibration inputs of this Linear "
            f"{purpose}; the pipeline supplies them"
        )


def daq_orders(
    weight: torch.Tensor, factors: HessianFactors | None, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance Z (R, C) and the matrix-scope ABMP order map (G,) of one Linear (Alg. 3)."""
    z = importance(weight, factors, spec.z_mode)
    gsize = spec.effective_group_size(weight.shape[1])
    sizes = group_sizes(*weight.shape, gsize)
    (orders,) = allocate_orders([group_scores(z, gsize)], [sizes], spec.abmp_ratio, spec.order)
    return z, orders


def _binary_code(
    units: torch.Tensor, weights: torch.Tensor | None, order: int, spec: QuantSpec
) -> BinaryCode:
    """DAQ of a batch of groups (B, R, g) with optional loss weights lambda^2 (B, R, g)."""
    iters = spec.iters if spec.rsr else 0
    return daq_quantize(units, order, weights, iters, spec.eps, spec.row_center, spec.torch_scale_dtype)


def _daq_batched(
    problem: LinearProblem, spec: QuantSpec, order_list: list[int], lam2: torch.Tensor | None
) -> tuple[torch.Tensor, list[BinaryCode]]:
    """Without compensation the groups are independent: quantize groups of equal width and order
    together, at most `batch_elements` weights per batch (bounds the temporaries)."""
    w, slices = problem.weight, problem.slices
    q = torch.empty_like(w)
    codes: list[BinaryCode | None] = [None] * len(slices)
    buckets: dict[tuple[int, int], list[int]] = {}
    for index, cols in enumerate(slices):
        buckets.setdefault((cols.stop - cols.start, order_list[index]), []).append(index)
    per_batch = max(1, spec.batch_elements // (w.shape[0] * problem.group_size))
    batches = [
        (order, members[start : start + per_batch])
        for (_, order), members in buckets.items()
        for start in range(0, len(members), per_batch)
    ]
    for order, members in batches:
        units = torch.stack([w[:, slices[i]] for i in members])
        weights = None if lam2 is None else torch.stack([lam2[:, slices[i]] for i in members])
        code = _binary_code(units, weights, order, spec)
        deq = code.dequantize()
        for pos, i in enumerate(members):
            q[:, slices[i]] = deq[pos]
            codes[i] = _select(code, pos)
    return q, codes


def _daq_sequential(
    problem: LinearProblem,
    spec: QuantSpec,
    order_list: list[int],
    lam2: torch.Tensor | None,
    factors: HessianFactors,
    compensation: str,
) -> tuple[torch.Tensor, list[BinaryCode]]:
    """Groups in column order, each one's error compensated on the columns after it."""
    slices = problem.slices
    codes: list[BinaryCode | None] = [None] * len(slices)

    def quantize_block(block: torch.Tensor, index: int) -> torch.Tensor:
        weights = None if lam2 is None else lam2[:, slices[index]].unsqueeze(0)
        code = _binary_code(block.unsqueeze(0), weights, order_list[index], spec)
        codes[index] = code
        return code.dequantize()[0]

    q = quantize_sequential(problem.weight, slices, quantize_block, factors.upper, compensation)
    return q, codes


def _select(code: BinaryCode, pos: int) -> BinaryCode:
    """The code of one unit of a batch, keeping a G axis of length 1."""
    sl = slice(pos, pos + 1)
    return BinaryCode(
        code.row_scales[:, sl],
        code.col_scales[:, sl],
        code.signs[:, sl],
        None if code.row_mean is None else code.row_mean[sl],
    )


METHODS: dict[str, QuantMethod] = {
    method.name: method for method in (Identity(), RoundToNearest(), GPTQ(), GPTAQ(), SliM(), DAQ(), AWQ())
}


def get_method(name: str) -> QuantMethod:
    """The method registered as `name`; `QuantConfigError` listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise QuantConfigError(
            f"quant.method={name!r}: unknown method; known methods are {sorted(METHODS)}"
        ) from None
