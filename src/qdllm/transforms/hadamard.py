"""Hadamard matrices and fast orthogonal rotations built from them (QuaRot, Ashkboos et al. 2024).

A Hadamard matrix H of order n has entries +-1 and H H^T = n I; H / sqrt(n) is orthogonal. Orders
other than 1 and 2 are multiples of 4. This module builds H for n = m * 2^k with

* 2^k: Sylvester's construction H_{2p} = [[H_p, H_p], [H_p, -H_p]], applied in O(n log n) by the fast
  Walsh-Hadamard transform (`fwht`), never stored;
* m: a Kronecker product of Paley matrices, stored dense (m is small):
  Paley I, q prime, q = 3 mod 4 -> order q + 1;  Paley II, q prime, q = 1 mod 4 -> order 2 (q + 1).

The sizes of the supported models: 64 = 2^6 (head_dim), 1536 = 12 * 128 (12: Paley I, q = 11),
576 = 36 * 16 (36: Paley II, q = 17), 3584 = 28 * 128 (28: Paley II, q = 13), 4096 = 2^12,
12288 = 12 * 1024, 18944 = 148 * 128 (148: Paley II, q = 73). Prime powers q (GF(q) arithmetic) and
Williamson-type constructions are not implemented: e.g. 92 and 172 * 2^k raise `HadamardError`.

`rotation(n, seed=..., fallback=True)` returns an orthogonal n x n transform Q = (F ⊗ H_{2^k}/sqrt(2^k))
diag(d): F the normalised Paley product, d optional seeded random signs (randomised Hadamard). Where
no Paley product of the needed order exists (e.g. 9 attention heads), the fallback makes F a seeded
Haar-random orthogonal matrix (QR of a Gaussian) of the odd part of n, still Kronecker-multiplied
with the fast 2^k part; the returned transform says so (`is_hadamard` False).
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import nn

FACTOR_DTYPE = torch.float64  # dense factors are built and stored in fp64; applied in the input's precision


class HadamardError(ValueError):
    """No Hadamard matrix of the requested order can be built; the message names the order and why."""


def is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % p for p in range(2, math.isqrt(q) + 1))


def paley_order_source(m: int) -> tuple[str, int] | None:
    """("I", q) or ("II", q) if a Paley construction with prime q gives order m, else None."""
    if is_prime(m - 1) and (m - 1) % 4 == 3:
        return "I", m - 1
    if m % 2 == 0 and is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "II", m // 2 - 1
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """(q, q) Jacobsthal matrix J[i, j] = chi(j - i), chi the quadratic character mod prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=FACTOR_DTYPE)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def paley_matrix(m: int) -> torch.Tensor:
    """(m, m) +-1 Hadamard matrix of order m by Paley I or II (`paley_order_source(m)` not None)."""
    source = paley_order_source(m)
    if source is None:
        raise HadamardError(
            f"order {m}: no Paley construction (needs m - 1 prime = 3 mod 4, or m/2 - 1 prime = 1 mod 4)"
        )
    kind, q = source
    jac = _jacobsthal(q)
    ones = torch.ones(q, 1, dtype=FACTOR_DTYPE)
    if kind == "I":  # skew conference matrix C = [[0, 1^T], [-1, J]], H = I + C
        conf = torch.cat(
            [torch.cat([torch.zeros(1, 1, dtype=FACTOR_DTYPE), ones.T], 1), torch.cat([-ones, jac], 1)]
        )
        return torch.eye(q + 1, dtype=FACTOR_DTYPE) + conf
    # symmetric conference matrix C = [[0, 1^T], [1, J]]; H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]
    conf = torch.cat(
        [torch.cat([torch.zeros(1, 1, dtype=FACTOR_DTYPE), ones.T], 1), torch.cat([ones, jac], 1)]
    )
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=FACTOR_DTYPE)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=FACTOR_DTYPE)
    return torch.kron(conf, a) + torch.kron(torch.eye(q + 1, dtype=FACTOR_DTYPE), b)


@cache
def _paley_product(m: int) -> tuple[int, ...] | None:
    """Paley orders (each > 2) whose product is m, fewest factors first; () for m = 1; None if none."""
    if m == 1:
        return ()
    if paley_order_source(m) is not None:
        return (m,)
    best = None
    for a in range(4, math.isqrt(m) + 1):
        if m % a or paley_order_source(a) is None:
            continue
        rest = _paley_product(m // a)
        if rest is not None and (best is None or len(rest) + 1 < len(best)):
            best = (a, *rest)
    return best


def hadamard_decomposition(n: int) -> tuple[tuple[int, ...], int]:
    """n = prod(paley orders) * 2^k with the smallest dense part; returns (paley orders, 2^k).

    Raises `HadamardError` for n < 1, for n not 1, 2 or a multiple of 4, and for multiples of 4
    not covered by prime Paley constructions.
    """
    if not isinstance(n, int) or n < 1:
        raise HadamardError(f"order {n!r}: a Hadamard matrix needs a positive integer order")
    if n > 2 and n % 4:
        raise HadamardError(f"order {n}: Hadamard matrices exist only for orders 1, 2 and multiples of 4")
    pow2 = n & -n
    power = pow2
    while power >= 1:  # largest power of two first: the dense part m = n / power is smallest
        factors = _paley_product(n // power)
        if factors is not None:
            return factors, power
        power //= 2
    raise HadamardError(
        f"order {n} = {n // pow2} * 2^{pow2.bit_length() - 1}: no product of prime Paley matrices "
        "(orders q + 1, q prime = 3 mod 4, or 2(q + 1), q prime = 1 mod 4) times a power of two gives it"
    )


def dense_factor(orders: tuple[int, ...]) -> torch.Tensor:
    """(m, m) +-1 Kronecker product of the Paley matrices of `orders` (m = prod(orders))."""
    out = torch.ones(1, 1, dtype=FACTOR_DTYPE)
    for m in orders:
        out = torch.kron(out, paley_matrix(m))
    return out


def sylvester_matrix(p: int) -> torch.Tensor:
    """(p, p) +-1 Sylvester Hadamard matrix, p a power of two (dense; for references and small p)."""
    if p < 1 or p & (p - 1):
        raise HadamardError(f"order {p}: Sylvester's construction needs a power of two")
    out = torch.ones(1, 1, dtype=FACTOR_DTYPE)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=FACTOR_DTYPE)
    while out.shape[0] < p:
        out = torch.kron(h2, out)
    return out


def hadamard_matrix(n: int) -> torch.Tensor:
    """(n, n) +-1 Hadamard matrix (fp64, dense): Paley product ⊗ Sylvester(2^k)."""
    orders, power = hadamard_decomposition(n)
    return torch.kron(dense_factor(orders), sylvester_matrix(power))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform along the last dim: x @ H_p (Sylvester), p = 2^k.

    Sylvester's H_p is the Kronecker power of H_2, one H_2 per index bit, so the butterflies of the
    bits can run in any order; log2(p) passes of (a + b, a - b).
    """
    p = x.shape[-1]
    if p & (p - 1):
        raise HadamardError(f"fwht: last dim {p} is not a power of two")
    lead = x.shape[:-1]
    src, dst = x.contiguous().clone(), torch.empty_like(x, memory_format=torch.contiguous_format)
    h = 1
    while h < p:  # ping-pong between two buffers: no allocation per pass
        a = src.view(*lead, p // (2 * h), 2, h)
        b = dst.view(*lead, p // (2 * h), 2, h)
        torch.add(a[..., 0, :], a[..., 1, :], out=b[..., 0, :])
        torch.sub(a[..., 0, :], a[..., 1, :], out=b[..., 1, :])
        src, dst = dst, src
        h *= 2
    return src


def random_orthogonal(m: int, generator: torch.Generator) -> torch.Tensor:
    """(m, m) Haar-random orthogonal matrix (fp64): QR of a Gaussian, columns' signs fixed by diag(R)."""
    gauss = torch.randn(m, m, generator=generator, dtype=FACTOR_DTYPE)
    q, r = torch.linalg.qr(gauss)
    return q * torch.sign(torch.diagonal(r))


class KroneckerRotation(nn.Module):
    """Orthogonal Q = (F ⊗ H_p / sqrt(p)) diag(d), n = m * p, applied without forming Q.

    F (m, m) orthogonal (a normalised Paley product, or a random orthogonal fallback), p = 2^k,
    d (n,) +-1 signs or None. `forward(x)` is x @ Q along the last dim of x (..., n), `forward(x,
    transpose=True)` is x @ Q^T. Computed in fp64 for fp64 inputs, else in fp32 (the result is cast
    back to x's dtype). Buffers move with the module (`.to(device)`).
    """

    def __init__(self, factor: torch.Tensor, power: int, signs: torch.Tensor | None, is_hadamard: bool):
        super().__init__()
        self.power = int(power)
        self.n = factor.shape[0] * self.power
        self.is_hadamard = is_hadamard
        self.register_buffer("factor", factor.to(FACTOR_DTYPE).contiguous(), persistent=False)
        self.register_buffer("signs", None if signs is None else signs.to(FACTOR_DTYPE), persistent=False)

    def forward(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"rotation of order {self.n} applied to a tensor with last dim {x.shape[-1]}")
        dtype = x.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        y = x.to(work)
        if transpose and self.signs is not None:  # Q^T = diag(d) (F^T ⊗ H_p)/sqrt(p): signs first
            y = y * self.signs.to(work)
        m = self.factor.shape[0]
        y = y.reshape(*x.shape[:-1], m, self.power)
        if self.power > 1:
            y = fwht(y) / math.sqrt(self.power)
        if m > 1:
            # x @ (F ⊗ B) on x viewed as (m, p): F^T X B; transposed: F X B (B symmetric)
            f = self.factor.to(work)
            y = torch.einsum("ij,...jp->...ip", f if transpose else f.T, y)
        y = y.reshape(x.shape)
        if not transpose and self.signs is not None:
            y = y * self.signs.to(work)
        return y.to(dtype)

    def record(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able arguments, tensors) that `from_record` rebuilds this rotation from."""
        tensors = {"factor": self.factor} | ({} if self.signs is None else {"signs": self.signs})
        return {"power": self.power, "is_hadamard": self.is_hadamard}, tensors

    @classmethod
    def from_record(cls, args: dict, tensors: dict[str, torch.Tensor]) -> KroneckerRotation:
        return cls(tensors["factor"], args["power"], tensors.get("signs"), args["is_hadamard"])

    def matrix(self) -> torch.Tensor:
        """Dense (n, n) Q in fp64 (for tests and small n)."""
        eye = torch.eye(self.n, dtype=FACTOR_DTYPE, device=self.factor.device)
        return self.forward(eye)


def rotation(n: int, seed: int | None = None, fallback: bool = False) -> KroneckerRotation:
    """Orthogonal n x n (randomised) Hadamard rotation.

    seed: None for the plain normalised Hadamard; an int for random +-1 signs d (and the fallback
    factor) drawn from a CPU generator seeded with it, so a seed gives the same matrix everywhere.
    fallback: if no Hadamard of order n is constructible, use a Haar-random orthogonal matrix of the
    odd part of n (seeded by `seed`, 0 if None) ⊗ the fast Hadamard of the power-of-two part instead of
    raising `HadamardError`.
    """
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    signs = None
    if seed is not None:
        signs = torch.randint(0, 2, (n,), generator=generator).to(FACTOR_DTYPE) * 2 - 1
    try:
        orders, power = hadamard_decomposition(n)
    except HadamardError:
        if not fallback or not isinstance(n, int) or n < 1:
            raise
        power = n & -n
        return KroneckerRotation(random_orthogonal(n // power, generator), power, signs, is_hadamard=False)
    factor = dense_factor(orders)
    return KroneckerRotation(factor / math.sqrt(factor.shape[0]), power, signs, is_hadamard=True)
