"""The validated settings of one weight quantization (`quantize_weight`'s `cfg`).

`QuantSpec` is the flat, framework-free view of the Hydra `quant` node merged with the `abmp`
node. `QuantSpec.from_any` accepts a dataclass, an OmegaConf node or a plain dict, rejects unknown
keys and out-of-range values with a message naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qdllm.quant.errors import QuantConfigError, check_field
from qdllm.quant.methods import get_method

# ABMP's share of weights moved to K+1 (and as many to K-1): the paper's LLaDA setting (Table 2b).
# The Hydra schema uses it too; a model recipe overrides it (`model.recipe.abmp_ratio`, Dream 0.10).
DEFAULT_ABMP_RATIO = 0.05
Z_MODES = ("inv_diag_sq", "inv_diag", "chol_diag_sq", "magnitude")
COMPENSATIONS = ("auto", "off", "diag", "exact")
DOR_SCOPES = ("group", "matrix")
ABMP_SCOPES = ("matrix", "block")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantSpec:
    """Every knob of `quantize_weight`; `method` names a `qdllm.quant.methods.QuantMethod`.

    `bits` is the width of every method: DAQ's order K (paper eq. 3) is `bits`. `order` may be
    left out (None: it becomes `bits`); given, it must equal `bits`.
    """

    method: str = "daq"
    # uniform quantizers (rtn, gptq)
    bits: int = 2
    sym: bool = False
    group_size: int = 128
    require_full_groups: bool = False
    # gptq
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    # gptaq: weight of the asymmetric-calibration term (0.25 in the reference code)
    gptaq_alpha: float = 0.25
    # slim (SliM-LLM): weight of salient elements in SQC; calibration tokens for the KL choice of k
    slim_lambda: float = 1.0
    slim_kl_tokens: int = 2048
    # awq (Lin et al. 2024): alpha grid size, clipping grid and its largest shrink, raw input rows
    # read for the activation scale mean |x|
    awq_alpha_grid: int = 20
    awq_clip_grid: int = 20
    awq_clip_max_shrink: float = 0.5
    awq_max_rows: int = 8192
    # daq (paper eq. 3-10, Alg. 2); order K = bits
    order: int | None = None
    lam: float = 2.0
    iters: int = 10
    z_mode: str = "inv_diag_sq"
    dor: bool = True
    dor_scope: str = "group"
    dor_k_sigma: float = 3.0
    rsr: bool = True
    row_center: bool = False
    eps: float = 1e-7
    # cross-group error compensation (GPTQ/OBC style; any per-group quantizer).
    # "auto" = the method's own default (`QuantMethod.default_compensation`); GPTQ-style methods
    # compensate column by column, built in
    compensation: str = "auto"
    # Hessian utilities
    damp: float = 0.01
    damp_max_tries: int = 8
    # storage precision of every scale (the packed format stores them in this dtype)
    scale_dtype: str = "float16"
    # groups quantized together when there is no compensation (bounds temporaries; CPU caches
    # favour small batches, GPUs large ones)
    batch_elements: int = 2**22
    # ABMP (Alg. 3)
    abmp_ratio: float = DEFAULT_ABMP_RATIO
    abmp_scope: str = "matrix"

    def __post_init__(self) -> None:
        if self.order is None:  # frozen: the one place the default order is filled in
            object.__setattr__(self, "order", self.bits)

    @classmethod
    def from_any(cls, cfg: Any) -> QuantSpec:
        """Build from a QuantSpec, dataclass, OmegaConf node or mapping; validate every field."""
        if isinstance(cfg, cls):
            return cfg.validated()
        if dataclasses.is_dataclass(cfg):
            cfg = dataclasses.asdict(cfg)
        elif not isinstance(cfg, Mapping):
            try:
                from omegaconf import OmegaConf

                cfg = OmegaConf.to_container(cfg, resolve=True)
            except Exception as exc:  # not an OmegaConf node either
                raise QuantConfigError(
                    f"quant config must be a mapping, dataclass or OmegaConf node, got {type(cfg).__name__}"
                ) from exc
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise QuantConfigError(f"unknown quant config key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**dict(cfg)).validated()

    def validated(self) -> QuantSpec:
        """Check every field, then the method's own rules; return self."""
        method = get_method(self.method)
        self._check_ranges()
        method.validate(self)
        return self

    def _check_ranges(self) -> None:
        def need(ok: bool, field: str, msg: str) -> None:
            check_field(ok, self, field, msg)

        need(isinstance(self.bits, int) and 1 <= self.bits <= 8, "bits", "must be an int in [1, 8]")
        need(
            self.order == self.bits,
            "order",
            f"contradicts quant.bits={self.bits!r}: DAQ's order K is the bit width; set quant.bits alone",
        )
        need(
            isinstance(self.group_size, int) and (self.group_size == -1 or self.group_size >= 1),
            "group_size",
            "must be a positive int, or -1 for one group per row",
        )
        need(self.block_size >= 1, "block_size", "must be >= 1")
        need(self.gptaq_alpha >= 0, "gptaq_alpha", "must be >= 0 (0 turns GPTAQ into GPTQ)")
        need(self.slim_lambda > 0, "slim_lambda", "must be > 0")
        need(self.slim_kl_tokens >= 1, "slim_kl_tokens", "must be >= 1")
        for name in ("awq_alpha_grid", "awq_clip_grid", "awq_max_rows"):
            value = getattr(self, name)
            need(_is_int(value) and value >= 1, name, "must be an int >= 1")
        need(
            isinstance(self.awq_clip_max_shrink, (int, float)) and 0.0 <= self.awq_clip_max_shrink < 1.0,
            "awq_clip_max_shrink",
            "must lie in [0, 1) (0 turns the clipping search off; AWQ uses 0.5)",
        )
        need(self.lam >= 1.0, "lam", "the outlier weight lambda must be >= 1 (1 disables DOR)")
        need(isinstance(self.iters, int) and self.iters >= 0, "iters", "must be an int >= 0")
        need(self.z_mode in Z_MODES, "z_mode", f"must be one of {Z_MODES}")
        need(self.dor_scope in DOR_SCOPES, "dor_scope", f"must be one of {DOR_SCOPES}")
        need(self.dor_k_sigma > 0, "dor_k_sigma", "must be > 0")
        need(self.eps > 0, "eps", "must be > 0")
        need(self.compensation in COMPENSATIONS, "compensation", f"must be one of {COMPENSATIONS}")
        need(self.damp > 0, "damp", "relative damping must be > 0 (GPTQ uses 0.01)")
        need(self.damp_max_tries >= 1, "damp_max_tries", "must be >= 1")
        need(self.batch_elements >= 1, "batch_elements", "must be >= 1")
        need(self.scale_dtype in SCALE_DTYPES, "scale_dtype", f"must be one of {list(SCALE_DTYPES)}")
        need(0.0 <= self.abmp_ratio <= 0.5, "abmp_ratio", "must lie in [0, 0.5] (0 turns ABMP off)")
        need(self.abmp_scope in ABMP_SCOPES, "abmp_scope", f"must be one of {ABMP_SCOPES}")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def scale_bits(self) -> int:
        return torch.finfo(self.torch_scale_dtype).bits

    def effective_group_size(self, in_features: int) -> int:
        """Columns per group; -1 means one group spanning all columns."""
        return in_features if self.group_size == -1 else min(self.group_size, in_features)
