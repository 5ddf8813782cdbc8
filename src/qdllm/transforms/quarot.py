"""QuaRot (Ashkboos et al., NeurIPS 2024): rotate a dLLM so its activations lose their outliers,
leaving the full-precision function unchanged.

Row-vector convention: a Linear computes y = x W^T + b, W (out, in). With Q an orthogonal d x d
matrix (a randomised Hadamard, QuaRot §4) the transform is

1. Fold every RMSNorm weight g into the Linears that read it: W <- W diag(g), g <- 1 (the final
   norm into the LM head). RMSNorm(x) = g * x / rms(x) with unit g commutes with Q because
   rms(x Q) = rms(x) (Q preserves the Euclidean norm, so the mean square).
2. Residual stream h -> h Q: embedding rows E <- E Q; Linears reading the residual (q, k, v, gate,
   up, LM head) W <- W Q; Linears writing it (attn_out, ffn_out) W <- Q^T W, b <- Q^T b. The q/k/v
   biases are on the output side of a rotated input and stay as they are. A tied embedding / head
   (smol_dllm) is untied first: the embedding gets E Q, the head W diag(g_final) Q.
3. Online Hadamard at the ffn_out input (QuaRot §4, the FFN's massive outliers): x -> x H_ff applied
   before the Linear by an `online.LastDimRotation`, W <- W H_ff folded, so x H_ff (W H_ff)^T = x W^T.
4. Attention output (QuaRot §4, "Hadamard heads"): per KV head, v_proj's output is rotated by the
   head_dim Hadamard H_hd (rows W_v,g <- H_hd^T W_v,g and its bias b_v,g <- H_hd^T b_v,g: the study's
   QuaRot left Dream's v bias unrotated, which breaks equivalence). Attention mixes tokens with one
   weight per head, so each head's output is rotated by the same H_hd (GQA: every query head reading
   KV head g gets g's rotation, the same H_hd). At the attn_out input an online `HeadMixing` applies
   H_heads ⊗ I across heads, and attn_out's weight absorbs the whole H_heads ⊗ H_hd. The attn_out
   input is then rotated by a full Kronecker Hadamard although only the head mixing runs online.

Online Hadamards are plain (normalised, no random signs); Q carries seeded random signs. Orders with
no Hadamard construction (smol_dllm's 9 heads; see `hadamard.py`) use a seeded Haar-random
orthogonal factor instead (`QuaRotReport.fallbacks` lists them). All folds are computed in fp64 on
the weights' device and written back in their dtype. Not done here: the online Hadamard on Q/K
after RoPE that QuaRot uses for K-cache quantization (a job of the activation quantizer); the
embedding mean-centring of upstream QuaRot (exact for LayerNorm only, not for RMSNorm models).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qdllm.models.base import DiffusionLM
from qdllm.transforms.folding import TransformError, fold_rms_norm, transform_columns, transform_rows
from qdllm.transforms.hadamard import KroneckerRotation, rotation
from qdllm.transforms.online import HeadMixing, LastDimRotation, attach_input_transform


@dataclass
class QuaRotSpec:
    """Knobs of `apply_quarot`.

    seed: random signs of the residual rotation Q (and of Haar fallbacks); a seed gives the same Q.
    online_ffn_out: online Hadamard at the ffn_out (down_proj) input.
    online_attn_out: per-head Hadamard in v_proj + online head mixing at the attn_out input.
    """

    seed: int = 0
    online_ffn_out: bool = True
    online_attn_out: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TransformError(f"quarot.seed={self.seed!r}: must be an integer")
        for name in ("online_ffn_out", "online_attn_out"):
            if not isinstance(getattr(self, name), bool):
                raise TransformError(f"quarot.{name}={getattr(self, name)!r}: must be true or false")


@dataclass
class QuaRotReport:
    """What `apply_quarot` did: rotation orders, online transforms (dotted Linear names), fallbacks."""

    hidden: int
    online: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # "what (order)" that used a Haar factor
    untied_head: bool = False


def apply_quarot(dllm: DiffusionLM, spec: QuaRotSpec | None = None) -> QuaRotReport:
    """Rotate `dllm` in place (see the module docstring); its logits are unchanged in exact arithmetic."""
    spec = spec or QuaRotSpec()
    anatomy = dllm.anatomy()
    embedding = dllm.embedding()
    hidden = embedding.weight.shape[1]
    report = QuaRotReport(hidden=hidden)
    q = _rotation(hidden, spec.seed, "residual", report).to(embedding.weight.device)

    report.untied_head = untie_lm_head(dllm)
    head = dllm.lm_head_weight()
    fold_rms_norm(dllm.final_norm(), [head], "final norm")
    transform_rows(head, q.to(head.device))
    transform_rows(embedding.weight, q)

    names = dllm.module_names()
    for block in dllm.blocks():
        _rotate_block(block, anatomy, q, spec, report, names)
    return report


def _rotate_block(block: nn.Module, anatomy, q: KroneckerRotation, spec, report, names) -> None:
    qkv = [block.get_submodule(n) for n in anatomy.qkv]
    ffn_in = [block.get_submodule(n) for n in anatomy.ffn_in]
    attn_out, ffn_out = block.get_submodule(anatomy.attn_out), block.get_submodule(anatomy.ffn_out)
    q = q.to(attn_out.weight.device)

    fold_rms_norm(block.get_submodule(anatomy.attn_norm), [m.weight for m in qkv], anatomy.attn_norm)
    fold_rms_norm(block.get_submodule(anatomy.ffn_norm), [m.weight for m in ffn_in], anatomy.ffn_norm)
    for linear in (*qkv, *ffn_in):
        transform_rows(linear.weight, q)

    if spec.online_attn_out:
        heads, kv_heads, head_dim = anatomy.n_heads, anatomy.n_kv_heads, anatomy.head_dim
        if attn_out.weight.shape[1] != heads * head_dim or qkv[2].weight.shape[0] != kv_heads * head_dim:
            raise TransformError(
                f"{anatomy.attn_out}: input width {attn_out.weight.shape[1]} / v_proj output "
                f"{qkv[2].weight.shape[0]} do not match {heads} heads / {kv_heads} KV heads of {head_dim}"
            )
        device = attn_out.weight.device
        h_hd = _rotation(head_dim, None, "head_dim", report).to(device)
        h_heads = _rotation(heads, None, "heads", report).to(device)
        v = qkv[2]
        # v' = v H_hd per KV head: W_v^T <- W_v^T (I ⊗ H_hd), i.e. W_v <- (I ⊗ H_hd)^T W_v, b likewise
        transform_columns(v.weight, lambda w: _per_head(h_hd, w, kv_heads))
        if v.bias is not None:
            transform_rows(v.bias, lambda b: _per_head(h_hd, b, kv_heads))
        mixing = HeadMixing(h_heads, head_dim)
        # attn_out's input arrives as a (I ⊗ H_hd) (H_heads ⊗ I): W_o <- W_o (H_heads ⊗ H_hd)
        transform_rows(attn_out.weight, lambda w: mixing(_per_head(h_hd, w, heads)))
        attach_input_transform(attn_out, mixing)
        report.online.append(names[id(attn_out)])
    _write_residual(attn_out, q)

    if spec.online_ffn_out:
        h_ff = _rotation(ffn_out.weight.shape[1], None, "ffn_out", report).to(ffn_out.weight.device)
        transform_rows(ffn_out.weight, h_ff)
        attach_input_transform(ffn_out, LastDimRotation(h_ff))
        report.online.append(names[id(ffn_out)])
    _write_residual(ffn_out, q)


def _per_head(rot: KroneckerRotation, x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., heads * hd) -> each head's hd slice times the rotation."""
    return rot(x.reshape(*x.shape[:-1], heads, rot.n)).reshape(x.shape)


def _write_residual(linear: nn.Linear, q: KroneckerRotation) -> None:
    """A Linear writing the residual: y -> y Q, i.e. W <- Q^T W, b <- Q^T b (b as a row: b Q)."""
    q = q.to(linear.weight.device)
    transform_columns(linear.weight, q)
    if linear.bias is not None:
        transform_rows(linear.bias, q)


def _rotation(n: int, seed: int | None, what: str, report: QuaRotReport) -> KroneckerRotation:
    rot = rotation(n, seed=seed, fallback=True)
    if not rot.is_hadamard and f"{what} ({n})" not in report.fallbacks:
        report.fallbacks.append(f"{what} ({n})")
    return rot


@torch.no_grad()
def untie_lm_head(dllm: DiffusionLM) -> bool:
    """Give the LM head its own weight when it shares the embedding's; True if it did."""
    embedding = dllm.embedding().weight
    if dllm.lm_head_weight() is not embedding:
        return False
    copy = nn.Parameter(embedding.detach().clone(), requires_grad=False)
    model = dllm.model
    if dllm.family == "llada":
        linear = nn.Linear(embedding.shape[1], embedding.shape[0], bias=False, device="meta")
        linear.weight = copy
        model.transformer["ff_out"] = linear
        model.config.weight_tying = False
    elif isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head.weight = copy
        model.config.tie_word_embeddings = False
    else:
        raise TransformError(f"{dllm.family}: do not know how to untie this model's embedding and LM head")
    if dllm.lm_head_weight() is not copy:
        raise TransformError(f"{dllm.family}: untying the LM head did not take effect")
    return True
