"""DuQuant (Lin, Xu et al., NeurIPS 2024): smoothing, block rotations and a zigzag permutation of
every Linear input, folded so that the full-precision model is unchanged.

Row-vector convention, y = x W^T + b. At each of a block's four input sites (q/k/v after attn_norm,
attn_out after attention, gate/up after ffn_norm, ffn_out after the SwiGLU product), with m (C,)
the calibration max |x| per channel (`act_absmax`):

1. Smoothing (SmoothQuant eq. 4): s_j = m_j^alpha / max_o |W_oj|^(1 - alpha), W the site's Linears
   concatenated (upstream SmoothQuant; the study's code used q_proj / up_proj alone). x -> x / s is
   folded into the op before: the norm weight (g <- g / s), up_proj's rows and bias for ffn_out, and
   v_proj's rows and bias for attn_out (exact under GQA because s is shared by the query heads
   reading one KV head: m and max |W| are maximised over each group before s is formed). W <- W diag(s).
2. Rotation T = B1 P B2, x -> x T, W <- W T (so x T (W T)^T = x W^T): B1 and B2 block-diagonal
   (blocks of `block_size`, a ragged last block where C is not a multiple), P the zigzag permutation.

Greedy block rotation (this module's version of DuQuant's §3.2 "rotation"). Only the per-channel
maxima m are known, so the input is modelled as independent zero-mean channels of scale m_i,
covariance Sigma = diag(m^2), and T is chosen to lower the largest estimated channel scale
e_j = sqrt((T^T Sigma T)_jj) of x T. For one dominant channel (the massive-outlier token) this is
exact: the outlier's share of each rotated channel is what remains. An orthogonal rotation keeps
trace(T^T Sigma T), so the best a block can reach is the RMS of its m. Each step rotates, within
each block, the pair of channels with the largest and the smallest variance in their plane by the
angle that makes the two variances equal, (a_jj + a_kk) / 2 (the pair's sum is invariant): the
outlier is spread onto the quietest channel and no variance ever rises above the block's largest.
One massive channel reaches every channel of a block of n after n - 1 steps. A block stops when
its largest and smallest variance agree (up to `GAIN_RTOL`) or after `steps` steps. The angle uses
the pair's covariance, so correlated channels are handled: the second rotation works on the
covariance of the permuted B1 output, which is not diagonal (B1 mixed the channels of each block;
the zigzag deals them to different blocks), and spreads a massive channel that B1 spread over one
block again over all blocks (one massive channel ends near m / sqrt(C) on every channel). Unlike
upstream DuQuant, which fits one 128 x 128 matrix on the activation of one averaged sequence and
applies it to every block, each block here gets its own rotation from its own channel statistics.

Zigzag permutation (DuQuant §3.2): channels sorted by their estimate after B1 are dealt to blocks in
zigzag order (block 0, 1, ..., nb-1, then nb-1, ..., 0, ...), so every block gets a similar share
of the outlier mass before B2.

Why T runs online (an `online.InputTransform` pre-hook on each Linear of the site) and is not
folded into the op before the site: that op is an elementwise norm (q/k/v, gate/up), attention
(attn_out: it mixes tokens with one weight per head, so only within-head transforms could pass
into v_proj, and P moves channels across heads), or the elementwise SwiGLU product (ffn_out: only
diagonal scales and permutations pass through it, B1 does not). None of them absorbs a dense block
rotation; the smoothing scales do fold. Online cost per token: 2 C block_size + C multiply-adds.

Quantizer knobs (activation clip 0.9, weight clip 0.8, study §1.2) are carried in the spec for the
quantizers; this module does not quantize.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qdllm.models.base import DiffusionLM
from qdllm.transforms.folding import TransformError, transform_columns, transform_rows
from qdllm.transforms.online import InputTransform, attach_input_transform

GAIN_RTOL = 1e-9  # a block whose largest and smallest variance agree to this is flat: no more steps


@dataclass
class DuQuantSpec:
    """Knobs of `apply_duquant` (study defaults: QDLM's `--alpha 0.5 --block_size 128
    --max_rotation_step 256`, permutation_times 1; its activation clip `--lac 0.9` is `act.clip`, its
    weight clip `--swc 0.8` is not implemented).

    alpha: smoothing migration strength; smooth: apply smoothing at all; block_size: rotation blocks;
    steps: greedy rotation steps per block (upper limit); permute: zigzag permutation and second
    rotation; min_scale: floor of the activation and weight maxima in the smoothing formula (dead channels).
    """

    alpha: float = 0.5
    smooth: bool = True
    block_size: int = 128
    steps: int = 256
    permute: bool = True
    min_scale: float = 1e-5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise TransformError(f"duquant.alpha={self.alpha}: must lie in [0, 1] (study: 0.5)")
        for name in ("smooth", "permute"):
            if not isinstance(getattr(self, name), bool):
                raise TransformError(f"duquant.{name}={getattr(self, name)!r}: must be true or false")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2:
            raise TransformError(
                f"duquant.block_size={self.block_size!r}: must be an integer >= 2 (study: 128)"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise TransformError(f"duquant.steps={self.steps!r}: must be an integer >= 0 (study: 256)")
        if not self.min_scale > 0.0:
            raise TransformError(f"duquant.min_scale={self.min_scale}: must be > 0")


@dataclass
class SiteReport:
    """One input site: its Linears, the calibration max |x|, after smoothing, and estimated after T."""

    linears: list[str]
    absmax: float
    smoothed_absmax: float
    rotated_estimate: float


@dataclass
class DuQuantReport:
    sites: list[SiteReport] = field(default_factory=list)


class BlockRotation(InputTransform):
    """x -> x T, T = B1 P B2 on the last dim (..., C).

    r1, r2: (nb, n, n) block rotations (a ragged last block of C - (nb - 1) n channels is embedded
    in an identity; x is zero-padded to nb n); perm: (C,) with (x P)_k = x_perm[k].
    """

    kind = "block_rotation"

    def __init__(self, r1: torch.Tensor, perm: torch.Tensor, r2: torch.Tensor):
        super().__init__()
        self.channels = int(perm.numel())
        self.register_buffer("r1", r1, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("r2", r2, persistent=False)

    def record(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {}, {"r1": self.r1, "perm": self.perm, "r2": self.r2}

    @classmethod
    def from_record(cls, args: dict, tensors: dict[str, torch.Tensor]) -> BlockRotation:
        return cls(tensors["r1"], tensors["perm"], tensors["r2"])

    def _blocks(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        nb, n = r.shape[0], r.shape[1]
        y = F.pad(x, (0, nb * n - self.channels)).reshape(*x.shape[:-1], nb, n)
        out = torch.einsum("...bi,bij->...bj", y, r.to(x.dtype)).reshape(*x.shape[:-1], nb * n)
        return out[..., : self.channels]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.channels:
            raise ValueError(f"block rotation of {self.channels} channels applied to last dim {x.shape[-1]}")
        dtype = x.dtype
        y = x.to(torch.float64 if dtype == torch.float64 else torch.float32)
        y = self._blocks(self._blocks(y, self.r1)[..., self.perm], self.r2)
        return y.to(dtype)


def smoothing_scales(
    act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float, min_scale: float
) -> torch.Tensor:
    """(C,) s = m^alpha / w^(1 - alpha), both maxima floored at min_scale (SmoothQuant eq. 4)."""
    return act_max.clamp_min(min_scale).pow(alpha) / weight_max.clamp_min(min_scale).pow(1.0 - alpha)


def greedy_rotations(cov: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy pair (Givens) rotations per block (module docstring).

    cov: (nb, n, n) model covariance Sigma of each block's input. Returns R (nb, n, n) orthogonal and
    A = R^T Sigma R (nb, n, n), the covariance after R; no channel's variance ever exceeds the
    block's largest input variance.
    """
    nb, n, _ = cov.shape
    sigma = cov.to(torch.float64)
    r = torch.eye(n, dtype=torch.float64, device=sigma.device).expand(nb, n, n).clone()
    a = sigma.clone()
    rows = torch.arange(nb, device=sigma.device)
    for _ in range(steps):
        var = torch.diagonal(a, dim1=1, dim2=2)
        j, k = var.argmax(-1), var.argmin(-1)
        top, low, cross = var[rows, j], var[rows, k], a[rows, j, k]
        active = top - low > GAIN_RTOL * top
        if not active.any():
            break
        # channels j' = c y_j + s y_k, k' = -s y_j + c y_k have equal variances (a_jj + a_kk) / 2 when
        # (a_jj - a_kk) cos 2t + 2 a_jk sin 2t = 0
        theta = torch.where(active, 0.5 * torch.atan2(top - low, -2.0 * cross), torch.zeros_like(top))
        c, s = theta.cos()[:, None], theta.sin()[:, None]
        for m in (r, a):  # columns: R G and A G
            mj, mk = m[rows, :, j], m[rows, :, k]
            m[rows, :, j], m[rows, :, k] = c * mj + s * mk, c * mk - s * mj
        aj, ak = a[rows, j, :], a[rows, k, :]  # rows: G^T (A G)
        a[rows, j, :], a[rows, k, :] = c * aj + s * ak, c * ak - s * aj
    return r, r.transpose(1, 2) @ sigma @ r  # recomputed: no drift from the updates


def zigzag_permutation(maxima: torch.Tensor, block_size: int) -> torch.Tensor:
    """(C,) perm: channels by decreasing maximum dealt to blocks 0..nb-1, nb-1..0, ... (DuQuant §3.2);
    position b * block_size + p of the result holds old channel perm[...]. The ragged last block
    takes part in the first (C mod block_size) passes only."""
    channels = maxima.numel()
    n = min(block_size, channels)
    nb = -(-channels // n)
    sizes = [min(n, channels - b * n) for b in range(nb)]
    slots = []
    for p in range(n):
        order = range(nb) if p % 2 == 0 else range(nb - 1, -1, -1)
        slots.extend(b * n + p for b in order if p < sizes[b])
    ranked = torch.argsort(maxima.to(torch.float64), descending=True, stable=True)
    perm = torch.empty(channels, dtype=torch.long)
    perm[torch.tensor(slots, dtype=torch.long)] = ranked.cpu()
    return perm.to(maxima.device)


def _blockwise_rotations(cov: torch.Tensor, tail: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy rotations of (nb, n, n) block covariances; with 0 < tail < n the last block's first
    `tail` channels are real and the rest zero padding, rotated as a block of `tail` (embedded in an
    identity). Returns R and R^T Sigma R, both (nb, n, n)."""
    full = cov.shape[0] - (tail > 0)
    r = torch.eye(cov.shape[1], dtype=torch.float64, device=cov.device).expand_as(cov).clone()
    a = cov.to(torch.float64).clone()
    r[:full], a[:full] = greedy_rotations(cov[:full], steps)
    if tail:
        r_tail, a_tail = greedy_rotations(cov[-1:, :tail, :tail], steps)
        r[-1, :tail, :tail], a[-1, :tail, :tail] = r_tail[0], a_tail[0]
    return r, a


def _permuted_block_covariance(a: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Covariance blocks (nb, n, n) of y[..., perm] for y with block-diagonal covariance blocks `a`:
    entries between channels of different blocks of y are zero."""
    nb, n, _ = a.shape
    index = F.pad(perm, (0, nb * n - perm.numel()), value=-1).reshape(nb, n)
    valid = index >= 0
    block, pos = index.clamp_min(0) // n, index.clamp_min(0) % n
    same = (block[:, :, None] == block[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    return a[block[:, :, None], pos[:, :, None], pos[:, None, :]] * same


def block_transform(absmax: torch.Tensor, spec: DuQuantSpec) -> tuple[BlockRotation, torch.Tensor]:
    """T = B1 P B2 for an input whose per-channel max |x| is `absmax` (C,); returns T and the (C,)
    estimate sqrt((T^T diag(m^2) T)_jj) of max |(x T)_j| (module docstring)."""
    m = absmax.to(torch.float64)
    channels = m.numel()
    n = min(spec.block_size, channels)
    nb, tail = -(-channels // n), channels % n
    cov = torch.diag_embed(F.pad(m.square(), (0, nb * n - channels)).reshape(nb, n))
    r1, a = _blockwise_rotations(cov, tail, spec.steps)
    if spec.permute:
        perm = zigzag_permutation(_diagonal(a, channels).sqrt(), spec.block_size)
        r2, a = _blockwise_rotations(_permuted_block_covariance(a, perm), tail, spec.steps)
    else:
        perm = torch.arange(channels, device=m.device)
        r2 = torch.eye(n, dtype=torch.float64, device=m.device).expand_as(r1).clone()
    return BlockRotation(r1, perm, r2), _diagonal(a, channels).sqrt()


def _diagonal(a: torch.Tensor, channels: int) -> torch.Tensor:
    return torch.diagonal(a, dim1=1, dim2=2).reshape(-1)[:channels]


def apply_duquant(dllm: DiffusionLM, spec: DuQuantSpec, act_absmax: dict[str, torch.Tensor]) -> DuQuantReport:
    """Smooth and rotate every block's four input sites in place; the FP logits are unchanged.

    act_absmax: dotted Linear name in `dllm.model` (as `dllm.module_names()`) -> (C,) per-channel
    max |x| of that Linear's input over the calibration set, measured on the untransformed model.
    One Linear per site is enough (q/k/v and gate/up share their inputs; given several, their
    maximum is used).
    """
    anatomy = dllm.anatomy()
    names = dllm.module_names()
    report = DuQuantReport()
    heads, kv_heads, head_dim = anatomy.n_heads, anatomy.n_kv_heads, anatomy.head_dim
    for block in dllm.blocks():
        sub = block.get_submodule
        qkv = [sub(n) for n in anatomy.qkv]
        ffn_in = [sub(n) for n in anatomy.ffn_in]
        v, up = qkv[2], ffn_in[1]
        sites = [
            (qkv, _NormFold(sub(anatomy.attn_norm))),
            ([sub(anatomy.attn_out)], _RowFold(v, heads, kv_heads, head_dim)),
            (ffn_in, _NormFold(sub(anatomy.ffn_norm))),
            ([sub(anatomy.ffn_out)], _RowFold(up, 1, 1, up.weight.shape[0])),
        ]
        for linears, fold in sites:
            report.sites.append(_transform_site(linears, fold, spec, act_absmax, names))
    return report


class _NormFold:
    """x / s folded into an RMSNorm's weight (every channel its own scale)."""

    def __init__(self, norm: nn.Module):
        self.norm = norm

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.no_grad()
    def divide(self, s: torch.Tensor) -> None:
        w = self.norm.weight
        w.copy_((w.to(torch.float64) / s.to(w.device)).to(w.dtype))


class _RowFold:
    """x / s folded into the output rows (and bias) of the Linear producing x: v_proj (its KV-head
    rows serve `heads / kv_heads` query heads each) or up_proj (one group)."""

    def __init__(self, linear: nn.Linear, heads: int, kv_heads: int, head_dim: int):
        if heads % kv_heads or linear.weight.shape[0] != kv_heads * head_dim:
            raise TransformError(
                f"{type(linear).__name__} with {linear.weight.shape[0]} outputs cannot feed {heads} heads "
                f"from {kv_heads} KV heads of {head_dim}: check the model's anatomy()"
            )
        self.linear, self.heads, self.kv_heads, self.head_dim = linear, heads, kv_heads, head_dim

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """(heads * hd,) per-channel maxima -> (kv_heads * hd,): the max over each KV head's query heads."""
        group = self.heads // self.kv_heads
        return x.reshape(self.kv_heads, group, self.head_dim).amax(1).reshape(-1)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        group = self.heads // self.kv_heads
        return x.reshape(self.kv_heads, 1, self.head_dim).expand(-1, group, -1).reshape(-1)

    def divide(self, s_shared: torch.Tensor) -> None:
        transform_columns(self.linear.weight, lambda wt: wt / s_shared.to(wt.device))
        if self.linear.bias is not None:
            transform_rows(self.linear.bias, lambda b: b / s_shared.to(b.device))


def _site_absmax(linears: list[nn.Linear], act_absmax: dict, names: dict[int, str]) -> torch.Tensor:
    found = [act_absmax[names[id(m)]] for m in linears if names[id(m)] in act_absmax]
    channels = linears[0].weight.shape[1]
    label = " / ".join(names[id(m)] for m in linears)
    if not found:
        raise TransformError(
            f"act_absmax has no entry for {label}: give the (C,) max |x| of the input of every block's "
            "q/k/v, attn_out, gate/up and ffn_out Linears, keyed by dotted name in dllm.model"
        )
    out = torch.stack([torch.as_tensor(t).to(torch.float64).reshape(-1) for t in found]).amax(0)
    if out.numel() != channels or not torch.isfinite(out).all() or (out < 0).any():
        raise TransformError(
            f"act_absmax[{label}]: expected {channels} finite nonnegative per-channel maxima, "
            f"got shape {tuple(found[0].shape)}"
        )
    return out.to(linears[0].weight.device)


def _transform_site(linears, fold, spec: DuQuantSpec, act_absmax, names) -> SiteReport:
    m = _site_absmax(linears, act_absmax, names)
    if spec.smooth:
        w_max = torch.cat([lin.weight.detach().to(torch.float64) for lin in linears]).abs().amax(0)
        s_fold = smoothing_scales(fold.shared(m), fold.shared(w_max), spec.alpha, spec.min_scale)
        s = fold.expand(s_fold)
        fold.divide(s_fold)
        for lin in linears:
            transform_rows(lin.weight, lambda rows: rows * s.to(rows.device))
    else:
        s = torch.ones_like(m)
    smoothed = m / s
    transform, estimate = block_transform(smoothed, spec)
    transform = transform.to(linears[0].weight.device)
    for lin in linears:
        transform_rows(lin.weight, transform)
        attach_input_transform(lin, transform)
    return SiteReport(
        linears=[names[id(lin)] for lin in linears],
        absmax=float(m.max()),
        smoothed_absmax=float(smoothed.max()),
        rotated_estimate=float(estimate.max()),
    )
