"""Symmetric activation fake-quantization (the "A" of WxAy) and the hooks that apply it to a model.

The math (`fake_quantize_activations`) is a pure tensor function. `install_activation_quant` puts
it at the input of every quantized Linear of a diffusion LM (the Linears of `dllm.stages` in every
block, whatever their type: `nn.Linear` or a packed `QuantizedLinear`) with forward-pre-hooks, and
optionally at the output of the Q and K projections. It is installed after weight quantization
and before evaluation, the same way for every weight method, so the evaluation sees the WxAy model.

Quantizer (SmoothQuant / QuaRot convention, symmetric, restricted range; b = bits):
    q_max = 2^(b-1) - 1,  scale = clip * max|x| / q_max  (max over one token or the whole tensor),
    x_hat = scale * clamp(round(x / scale), -q_max, q_max).
Dynamic: the scale is computed from the activation itself at every call, in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from qdllm.errors import require

if TYPE_CHECKING:
    from qdllm.models.base import DiffusionLM

GRANULARITIES = ("token", "tensor")
MIN_BITS, MAX_BITS = 2, 16  # 2: the smallest symmetric grid with a nonzero level (q_max = 1)


def check_act_settings(bits: int, granularity: str, clip: float) -> None:
    """Raise `ConfigError` naming the `act.<field>` that is out of range."""
    require(
        isinstance(bits, int) and not isinstance(bits, bool) and MIN_BITS <= bits <= MAX_BITS,
        "act.bits",
        bits,
        f"must be an int in [{MIN_BITS}, {MAX_BITS}], or null (act=none) for unquantized activations",
    )
    require(granularity in GRANULARITIES, "act.granularity", granularity, f"use one of {GRANULARITIES}")
    require(0.0 < clip <= 1.0, "act.clip", clip, "the clip ratio must lie in (0, 1] (1: no clipping)")


@dataclass
class ActSpec:
    """The `act` node: activation fake-quantization at the input of every quantized Linear.

    bits: width of the symmetric grid; None leaves activations in the model dtype (W?A16).
    granularity: `token` (one scale per token, i.e. per row of the last dimension) or `tensor` (one
        scale per call, over the whole batch: the result then depends on what else is in the batch).
    clip: the scale covers clip * max|x|; larger values saturate at +-q_max (DuQuant uses 0.9).
    qk: also quantize the outputs of the Q and K projections, per token and head (per tensor with
        `granularity=tensor`), before RoPE; QDLM quantizes Q/K after RoPE inside the attention.
    """

    bits: int | None = None
    granularity: str = "token"
    clip: float = 1.0
    qk: bool = False

    @property
    def enabled(self) -> bool:
        return self.bits is not None

    def validated(self) -> ActSpec:
        if self.enabled:
            check_act_settings(self.bits, self.granularity, self.clip)
        else:  # the other fields are still checked so that a typo fails even when off
            check_act_settings(MAX_BITS, self.granularity, self.clip)
        return self


def fake_quantize_activations(
    x: torch.Tensor, bits: int, granularity: str = "token", clip: float = 1.0
) -> torch.Tensor:
    """Symmetric fake-quantization of activations (module docstring for the formula).

    Args:
        x: (..., C) activations, any float dtype; with `token` every index of the leading
            dimensions is one token and gets its own scale from its C values.
        bits: grid width b >= 2 (levels -q_max..q_max, q_max = 2^(b-1) - 1).
        granularity: `token` | `tensor` (one scale for all of x).
        clip: ratio in (0, 1] of max|x| that the largest level represents.

    Returns:
        (..., C) tensor of x's dtype: scale * q with integer q in [-q_max, q_max]. Statistics and
        rounding in fp32; a token (or tensor) of zeros stays zero. For |x| <= clip * max|x| the
        error is at most scale / 2.
    """
    check_act_settings(bits, granularity, clip)
    xf = x.to(torch.float32)
    q_max = 2 ** (bits - 1) - 1
    if granularity == "token":
        absmax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        absmax = xf.abs().amax()
    scale = absmax * clip / q_max
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: any scale is exact
    q = torch.clamp(torch.round(xf / scale), -q_max, q_max)
    return (q * scale).to(x.dtype)


@dataclass
class ActivationHooks:
    """Handles of the installed hooks; `linears` Linears have a quantized input, `outputs`
    projections (Q, K) a quantized output."""

    handles: list = field(default_factory=list)
    linears: int = 0
    outputs: int = 0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _quantize_input(spec: ActSpec, _module: nn.Module, args: tuple) -> tuple:
    return (fake_quantize_activations(args[0], spec.bits, spec.granularity, spec.clip), *args[1:])


def _quantize_heads(spec: ActSpec, head_dim: int, _module: nn.Module, _args: tuple, out: torch.Tensor):
    """(..., H * head_dim) projection output, quantized per token and head (or per tensor)."""
    heads = out.reshape(*out.shape[:-1], out.shape[-1] // head_dim, head_dim)
    return fake_quantize_activations(heads, spec.bits, spec.granularity, spec.clip).reshape(out.shape)


def install_activation_quant(dllm: DiffusionLM, spec: ActSpec) -> ActivationHooks:
    """Fake-quantize the input of every quantized Linear of `dllm` (and with `spec.qk` the Q and K
    projection outputs) from now on; returns the handles. `act=none` installs nothing, so the model
    computes exactly what it computed before.

    Call it after any transform's own online hooks (e.g. a rotation at a Linear input): PyTorch runs
    pre-hooks in registration order, so the quantizer then sees the transformed activation.
    """
    spec = spec.validated()
    hooks = ActivationHooks()
    if not spec.enabled:
        return hooks
    quantize_input = partial(_quantize_input, spec)
    for block in dllm.blocks():
        for stage in dllm.stages:
            for name in stage.linears:
                hooks.handles.append(block.get_submodule(name).register_forward_pre_hook(quantize_input))
                hooks.linears += 1
    if spec.qk:
        anatomy = dllm.anatomy()
        quantize_heads = partial(_quantize_heads, spec, anatomy.head_dim)
        for block in dllm.blocks():
            for name in anatomy.qkv[:2]:
                hooks.handles.append(block.get_submodule(name).register_forward_hook(quantize_heads))
                hooks.outputs += 1
    return hooks
