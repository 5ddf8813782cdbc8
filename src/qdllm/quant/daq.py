"""DAQ: the Data-aware Any-order Quantizer of Quant-dLLM (paper §3.3, eq. 3-10, Alg. 2).

Every function works on a batch of G units (all R rows x g columns of one column group) at once,
in fp32. A unit of order K is represented as (eq. 3)

    Q = mu 1^T + sum_{k=1..K} (a_k c_k^T) ⊙ B_k,   a_k in R^R, c_k in R^g, B_k in {-1, +1}^{R x g}

with the optional row mean mu (row centring, off by default). The Lambda^2-weighted objective is
L = sum_ij Lambda_ij^2 (W_ij - Q_ij)^2 (eq. 6-7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BinaryCode:
    """Order-K binary code of G units.

    Attributes:
        row_scales: (K, G, R) a_k.
        col_scales: (K, G, g) c_k.
        signs: (K, G, R, g) B_k in {-1, +1} (fp32).
        row_mean: (G, R) mu, or None without row centring.
    """

    row_scales: torch.Tensor
    col_scales: torch.Tensor
    signs: torch.Tensor
    row_mean: torch.Tensor | None = None

    @property
    def order(self) -> int:
        return self.signs.shape[0]

    def planes(self) -> torch.Tensor:
        """(K, G, R, g) scale planes s_k = a_k c_k^T."""
        return self.row_scales.unsqueeze(-1) * self.col_scales.unsqueeze(-2)

    def dequantize(self) -> torch.Tensor:
        """(G, R, g) Q of eq. 3."""
        q = (self.planes() * self.signs).sum(0)
        if self.row_mean is not None:
            q = q + self.row_mean.unsqueeze(-1)
        return q


def sign(x: torch.Tensor) -> torch.Tensor:
    """Sign with sign(0) = +1, as fp32 +-1."""
    return torch.where(x >= 0, 1.0, -1.0).to(torch.float32)


def binary_rc_init(w: torch.Tensor, order: int, eps: float) -> BinaryCode:
    """Greedy residual initialisation (Alg. 2 `binary_rc_init`).

    For k = 1..K on the residual E: a_k = mean_j |E|, c_k = mean_i |E| / a_k, B_k = sign(E),
    E <- E - (a_k c_k^T) ⊙ B_k.

    Args:
        w: (G, R, g) fp32 units.
    """
    resid = w.clone()
    rows, cols, signs = [], [], []
    for _ in range(order):
        mag = resid.abs()
        a = mag.mean(-1)
        c = (mag / a.clamp_min(eps).unsqueeze(-1)).mean(-2)
        b = sign(resid)
        resid -= a.unsqueeze(-1) * c.unsqueeze(-2) * b
        rows.append(a)
        cols.append(c)
        signs.append(b)
    return BinaryCode(torch.stack(rows), torch.stack(cols), torch.stack(signs))


def rsr_scales(w: torch.Tensor, lam2: torch.Tensor | None, code: BinaryCode, eps: float) -> BinaryCode:
    """One Gauss-Seidel pass of the closed-form row/column re-scaling (eq. 8-9) over all orders.

    With R^(k) = W - sum_{q != k} (a_q c_q^T) ⊙ B_q and P = Lambda^2 ⊙ R^(k) ⊙ B_k:
        a_k = (P c_k) / (Lambda^2 (c_k ⊙ c_k) + eps)
        c_k = (P^T a_k) / ((Lambda^2)^T (a_k ⊙ a_k) + eps)    (with the new a_k)
    Each update is the exact minimiser of the weighted loss in that block of variables.
    """
    a, c, b = code.row_scales.clone(), code.col_scales.clone(), code.signs
    planes = a.unsqueeze(-1) * c.unsqueeze(-2) * b
    q = planes.sum(0)
    for k in range(code.order):
        resid_k = w - (q - planes[k])
        p = resid_k * b[k]
        if lam2 is None:
            a[k] = (p @ c[k].unsqueeze(-1)).squeeze(-1) / (c[k].square().sum(-1, keepdim=True) + eps)
            c[k] = (a[k].unsqueeze(-2) @ p).squeeze(-2) / (a[k].square().sum(-1, keepdim=True) + eps)
        else:
            p = p * lam2
            den_a = (lam2 @ c[k].square().unsqueeze(-1)).squeeze(-1)
            a[k] = (p @ c[k].unsqueeze(-1)).squeeze(-1) / (den_a + eps)
            den_c = (a[k].square().unsqueeze(-2) @ lam2).squeeze(-2)
            c[k] = (a[k].unsqueeze(-2) @ p).squeeze(-2) / (den_c + eps)
        new_plane = a[k].unsqueeze(-1) * c[k].unsqueeze(-2) * b[k]
        q = q - planes[k] + new_plane
        planes[k] = new_plane
    return BinaryCode(a, c, b, code.row_mean)


def sign_search(w: torch.Tensor, row_scales: torch.Tensor, col_scales: torch.Tensor) -> torch.Tensor:
    """Joint 2^K sign update (Alg. 2 `update_B`; eq. 10 for K = 1).

    For every element pick p in {-1, +1}^K minimising |W_ij - sum_k p_k a_k,i c_k,j|. Patterns
    are enumerated as integers n = 0 .. 2^K - 1 with p_k = -1 iff bit k of n is set; ties go to
    the smaller n (so all +1 wins a tie, matching sign(0) = +1).

    Returns:
        (K, G, R, g) fp32 signs.
    """
    order = row_scales.shape[0]
    planes = row_scales.unsqueeze(-1) * col_scales.unsqueeze(-2)
    best_err = None
    best_idx = torch.zeros(w.shape, dtype=torch.int64, device=w.device)
    for n in range(2**order):
        v = sum(planes[k] if not (n >> k) & 1 else -planes[k] for k in range(order))
        err = (w - v).abs()
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_idx.masked_fill_(better, n)
    bits = torch.stack([(best_idx >> k) & 1 for k in range(order)])
    return (1 - 2 * bits).to(torch.float32)


def round_scales(code: BinaryCode, dtype: torch.dtype) -> BinaryCode:
    """Round every scale to its storage dtype, so the fake-quantized Q equals the packed one."""

    def rnd(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype).to(torch.float32)

    return BinaryCode(rnd(code.row_scales), rnd(code.col_scales), code.signs, rnd(code.row_mean))


def daq_quantize(
    w: torch.Tensor,
    order: int,
    lam2: torch.Tensor | None,
    iters: int,
    eps: float,
    row_center: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> BinaryCode:
    """Quantize G units to order K: greedy init, then `iters` RSR sweeps with joint signs.

    Args:
        w: (G, R, g) fp32 units.
        lam2: (G, R, g) Lambda^2 loss weights, or None for Lambda = 1 (no DOR).
        iters: RSR sweeps (0 = the Table 2c "baseline": init only).
    Returns:
        The code with scales rounded to `scale_dtype`.
    """
    mean = w.mean(-1) if row_center else None
    target = w - mean.unsqueeze(-1) if mean is not None else w
    code = binary_rc_init(target, order, eps)
    for _ in range(iters):
        code = rsr_scales(target, lam2, code, eps)
        code.signs = sign_search(target, code.row_scales, code.col_scales)
    code.row_mean = mean
    return round_scales(code, scale_dtype)
