"""SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers into the weights, exactly.

For a Linear group reading one input X (n, C) with weights W_i (R_i, C), per input channel c
(SmoothQuant eq. 4):

    s_c = max_t |X_tc|^alpha / max_{i,o} |W_i[o, c]|^(1 - alpha)

then X -> X diag(s)^-1 and W_i -> W_i diag(s), so X W_i^T is unchanged. diag(s)^-1 is folded into
the module that produces X, so the FP model computes the same function:

    site      consumers          producer of X (divided by s)
    qkv       q, k, v            attn_norm weight (RMSNorm: y = w * x / rms(x))
    ffn_in    gate, up           ffn_norm weight
    attn_out  attn_out (o)       v_proj rows and bias (attention mixes tokens, not channels);
                                 only without GQA, where v's rows map one to one onto o's columns
    ffn_out   down               up rows and bias (SwiGLU is linear in the up branch)

The weight maximum runs over all consumers (upstream SmoothQuant; QDLM's code used q_proj / up_proj
alone). Every s is computed from the weights as loaded, before any fold. A channel whose
activation or weight maximum is 0 keeps s = 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from qdllm.models.base import Anatomy, DiffusionLM
    from qdllm.transforms import TransformSpec

SMOOTH_SITES = ("qkv", "ffn_in", "attn_out", "ffn_out")


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """(C,) fp32 s = a^alpha / w^(1 - alpha) from (C,) activation and weight maxima; 1 where either is 0."""
    a, w = act_absmax.to(torch.float32), weight_absmax.to(torch.float32)
    live = (a > 0) & (w > 0)
    s = a.pow(alpha) / w.pow(1 - alpha)  # 0/0 where a channel is dead: replaced below
    return torch.where(live, s, torch.ones_like(s))


def _site_modules(anatomy: Anatomy, site: str) -> tuple[tuple[str, ...], str]:
    """(consumer Linears, producer module) of a site, block-relative names."""
    return {
        "qkv": (anatomy.qkv, anatomy.attn_norm),
        "ffn_in": (anatomy.ffn_in, anatomy.ffn_norm),
        "attn_out": ((anatomy.attn_out,), anatomy.qkv[2]),
        "ffn_out": ((anatomy.ffn_out,), anatomy.ffn_in[1]),
    }[site]


def _scale_(param: torch.Tensor, factor: torch.Tensor) -> None:
    """param <- param * factor (broadcast), computed in at least fp32, stored in param's dtype."""
    compute = torch.promote_types(param.dtype, torch.float32)
    param.copy_((param.to(compute) * factor.to(device=param.device, dtype=compute)).to(param.dtype))


def _fold(block: nn.Module, consumers: tuple[str, ...], producer: str, s: torch.Tensor) -> None:
    """Multiply the consumers' columns by s; divide the producer's output channels by s."""
    for name in consumers:
        _scale_(block.get_submodule(name).weight, s[None, :])
    module = block.get_submodule(producer)
    inverse = 1.0 / s.to(torch.float64)
    if isinstance(module, nn.Linear):  # a Linear's output channels are its weight rows (and bias)
        _scale_(module.weight, inverse[:, None])
        if module.bias is not None:
            _scale_(module.bias, inverse)
    else:  # an RMSNorm: its weight multiplies each output channel
        _scale_(module.weight, inverse)


def skip_reason(anatomy: Anatomy, site: str) -> str | None:
    """Why a site cannot be folded exactly in this model, or None."""
    if site == "attn_out" and anatomy.n_kv_heads != anatomy.n_heads:
        return (
            f"not folded: GQA (n_heads={anatomy.n_heads}, n_kv_heads={anatomy.n_kv_heads}), v_proj's "
            "rows do not map one to one onto attn_out's columns"
        )
    return None


@torch.no_grad()
def apply_smoothquant(
    dllm: DiffusionLM, spec: TransformSpec, act_absmax: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Smooth every block of `dllm` in place at `spec.sites` with `spec.alpha`.

    Args:
        act_absmax: full Linear name -> (C,) fp32 max |x| of its input over the calibration set
            (in the FP model; `qdllm.pipeline.transform.activation_absmax`).

    Returns:
        {"alpha", "folded": site -> blocks, "skipped": site -> reason, "scale_min", "scale_max"}.
    """
    anatomy = dllm.anatomy()
    names = dllm.module_names()
    sites = [site for site in spec.sites if skip_reason(anatomy, site) is None]
    plans = []
    for block in dllm.blocks():
        for site in sites:
            consumers, producer = _site_modules(anatomy, site)
            key = names[id(block.get_submodule(consumers[0]))]
            if key not in act_absmax:
                raise KeyError(
                    f"no activation maximum for {key}; act_absmax covers {len(act_absmax)} Linears"
                )
            weight_absmax = torch.stack(
                [
                    block.get_submodule(n).weight.detach().abs().amax(dim=0).to(torch.float32)
                    for n in consumers
                ]
            ).amax(dim=0)
            s = smoothing_scales(act_absmax[key].to(weight_absmax.device), weight_absmax, spec.alpha)
            plans.append((block, consumers, producer, s))
    for block, consumers, producer, s in plans:  # every s from the loaded weights, then the folds
        _fold(block, consumers, producer, s)
    scales = torch.cat([s for *_, s in plans]) if plans else torch.ones(1)
    return {
        "alpha": spec.alpha,
        "folded": {site: len(dllm.blocks()) for site in sites},
        "skipped": {site: skip_reason(anatomy, site) for site in spec.sites if site not in sites},
        "scale_min": float(scales.min()),
        "scale_max": float(scales.max()),
    }
