"""Linear algebra of sums of low-rank products, without forming d_out x d_in where avoidable.

A round of FlexLoRA or FLoRA aggregates ``W = sum_k w_k G_k @ A_k`` with G_k = scale_k * B_k
of shape (d_out, r_k) and A_k of shape (r_k, d_in). With stacked factors G = [w_1 G_1 ...]
(d_out, R) and H = [A_1; ...] (R, d_in), W = G @ H, and

    G = Q_g R_g,  H^T = Q_h R_h  =>  W = Q_g (R_g R_h^T) Q_h^T,

so the SVD of W is that of the small R x R core rotated back: O((d_out + d_in) R^2) instead of
O(d_out d_in min(d_out, d_in)). The core is computed in float64. When the summed rank R is so
large that the stacked factors outweigh the dense matrix, `LowRankSum` switches to a dense
float64 accumulator that streams over clients (memory independent of their number) and
extracts only the top-k triplets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.core.contract import FedLoraError, LoraFactors

F64 = torch.float64


def gram_r(X: Tensor, max_cond: float = 1e4) -> Tensor | None:
    """R of the thin QR of a tall float64 X (X = Q R) from the Cholesky factor of X^T X, or
    None when X is too ill-conditioned for the Gram matrix to be accurate.

    One BLAS-3 product instead of a Householder factorisation (several times faster on 2
    cores). Its error grows like eps * cond(X)^2, so it is used only while cond(X) stays below
    `max_cond` (error below ~1e-8 in float64); rank-deficient or ill-conditioned stacks (e.g.
    clients that all started from the same global factors) return None and take the
    Householder path. cond(X) = cond(R) is taken from R's singular values (an R x R problem,
    as cheap as the Cholesky itself): the ratio of R's diagonal entries is no bound on it and
    can underestimate it by many orders of magnitude (a Kahan-like R has a unit diagonal and
    an exponentially large condition number).
    """
    if X.shape[1] == 0 or X.shape[0] < X.shape[1]:
        return None
    R, info = torch.linalg.cholesky_ex(X.T @ X, upper=True)
    if info != 0 or not torch.isfinite(R).all():
        return None
    s = torch.linalg.svdvals(R)
    if s[-1] <= 0 or s[0] / s[-1] > max_cond:
        return None
    return R


def factored_svd(G: Tensor, H: Tensor, k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``G @ H`` from its factors G (m, R), H (R, n), in float64.

    Returns the top k (default all p = min(m, n, R)) triplets: U (m, k), S (k,), Vh (k, n),
    S descending. With G = Q_g R_g and H^T = Q_h R_h, the SVD of the small core
    R_g R_h^T = U_c S V_c^T gives U = G R_g^{-1} U_c and Vh = (R_h^{-1} V_c)^T H, so only the k
    wanted columns are ever rotated back.
    """
    G, H = G.to(F64), H.to(F64)
    Rg, Rh = gram_r(G), gram_r(H.T)
    if Rg is None or Rh is None:  # Householder QR: stable for any conditioning
        Qg, Rg = torch.linalg.qr(G)
        Qh, Rh = torch.linalg.qr(H.T)
        Uc, S, Vhc = torch.linalg.svd(Rg @ Rh.T, full_matrices=False)
        k = S.numel() if k is None else min(k, S.numel())
        return Qg @ Uc[:, :k], S[:k], Vhc[:k] @ Qh.T
    Uc, S, Vhc = torch.linalg.svd(Rg @ Rh.T, full_matrices=False)
    k = S.numel() if k is None else min(k, S.numel())
    U = G @ torch.linalg.solve_triangular(Rg, Uc[:, :k], upper=True)
    Vh = torch.linalg.solve_triangular(Rh, Vhc[:k].T, upper=True).T @ H
    return U, S[:k], Vh


def top_svd(
    W: Tensor,
    k: int,
    *,
    oversample: int = 16,
    tol: float = 1e-12,
    max_iters: int = 100,
    seed: int = 0,
):
    """Top-k singular triplets of a dense matrix, in float64.

    Exact LAPACK SVD when k is a sizeable share of min(m, n); otherwise a randomized subspace
    iteration (Halko et al. 2011, alg. 4.4) that only multiplies W by thin blocks, run until the
    top-k singular values change by less than `tol` (relative) between iterations.
    """
    W = W.to(F64)
    m, n = W.shape
    p = min(m, n)
    k = min(k, p)
    if k + oversample >= p // 4:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k]
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(W @ torch.randn(n, k + oversample, generator=g, dtype=F64))
    prev = None
    for _ in range(max_iters):
        Z, _ = torch.linalg.qr(W.T @ Q)
        Q, _ = torch.linalg.qr(W @ Z)
        S = torch.linalg.svdvals(Q.T @ W)[:k]
        if prev is not None and ((S - prev).abs() <= tol * S[0]).all():
            break
        prev = S
    Uc, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return (Q @ Uc)[:, :k], S[:k], Vh[:k]


class LowRankSum:
    """Streaming accumulator of ``sum_k w_k G_k @ A_k`` for one module of shape (d_out, d_in).

    Keeps the stacked factors while their summed rank R is below the dense break-even point
    ``d_out * d_in / (d_out + d_in)`` (or `dense_rank`), and a dense float64 sum after that.
    Memory is therefore bounded by one dense matrix whatever the number of clients.
    """

    def __init__(self, shape: tuple[int, int], *, dense_rank: int | None = None) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        d_out, d_in = self.shape
        self.dense_rank = dense_rank if dense_rank is not None else (d_out * d_in) // (d_out + d_in)
        self.G: list[Tensor] = []
        self.H: list[Tensor] = []
        self.rank = 0
        self.W: Tensor | None = None

    @property
    def is_dense(self) -> bool:
        return self.W is not None

    def add(self, G: Tensor, A: Tensor, weight: float = 1.0) -> None:
        """Add ``weight * G @ A`` (G (d_out, r), A (r, d_in))."""
        if (G.shape[0], A.shape[1]) != self.shape or G.shape[1] != A.shape[0]:
            raise FedLoraError(
                f"LowRankSum: factors {tuple(G.shape)} @ {tuple(A.shape)} do not make a "
                f"{self.shape} matrix"
            )
        G, A = weight * G.to(F64), A.to(F64)
        if self.W is None and self.rank + A.shape[0] <= self.dense_rank:
            self.G.append(G)
            self.H.append(A)
            self.rank += A.shape[0]
            return
        if self.W is None:
            self.W = torch.zeros(self.shape, dtype=F64)
            for g, h in zip(self.G, self.H):
                self.W.addmm_(g, h)
            self.G, self.H = [], []
        self.W.addmm_(G, A)
        self.rank += A.shape[0]

    def add_dense(self, W: Tensor) -> None:
        """Add a dense (d_out, d_in) matrix (e.g. DP noise): the sum becomes dense."""
        if tuple(W.shape) != self.shape:
            raise FedLoraError(f"LowRankSum: dense term {tuple(W.shape)} is not {self.shape}")
        if self.W is None:
            self.W = self.dense()
            self.G, self.H = [], []
        self.W.add_(W.to(F64))
        self.rank = max(self.rank, min(self.shape))

    def scale_(self, c: float) -> LowRankSum:
        """Multiply the sum by `c` in place (used to normalise weights after streaming)."""
        if self.W is not None:
            self.W.mul_(c)
        else:
            self.G = [c * g for g in self.G]
        return self

    def dense(self) -> Tensor:
        """The sum as a dense float64 matrix."""
        if self.W is not None:
            return self.W.clone()
        if not self.G:
            return torch.zeros(self.shape, dtype=F64)
        return torch.cat(self.G, 1) @ torch.cat(self.H, 0)

    def svd(self, k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k (default: all non-trivial) singular triplets of the sum, float64."""
        if self.W is not None:
            return top_svd(self.W, k if k is not None else min(self.shape))
        if not self.G:
            d_out, d_in = self.shape
            return (
                torch.zeros(d_out, 0, dtype=F64),
                torch.zeros(0, dtype=F64),
                torch.zeros(0, d_in, dtype=F64),
            )
        return factored_svd(torch.cat(self.G, 1), torch.cat(self.H, 0), k)

    def factors(self, rtol: float = 1e-12) -> LoraFactors:
        """The sum, exactly, as compact factors (scale 1): B = U S, A = Vh over the singular
        values above ``rtol * S_max`` (numerical rank; nothing of float32 size is dropped)."""
        U, S, Vh = self.svd()
        keep = int((S > rtol * S[0]).sum()) if S.numel() else 0
        return LoraFactors(Vh[:keep].clone(), U[:, :keep] * S[:keep], 1.0)


def rank_r_factors(
    U: Tensor,
    S: Tensor,
    Vh: Tensor,
    r: int,
    scale: float,
    *,
    split: str = "B",
    dtype: torch.dtype = torch.float32,
    pad_seed: int = 0,
) -> LoraFactors:
    """Best rank-r LoRA factors ``scale * B @ A = U_r S_r Vh_r`` (Eckart-Young).

    ``split="B"`` puts the singular values into B (FlexLoRA's released code); ``"sqrt"``
    splits sqrt(S) between A and B. Ranks above the number of triplets k get B = 0 and A rows
    that are orthonormal to the k right singular vectors and to each other (`orthonormal_rows`,
    seeded by `pad_seed`): the delta is unchanged, yet those slots learn (A = B = 0 would have
    zero gradient for ever). Only slots beyond d_in, where no such row exists, stay zero.
    """
    if split not in ("B", "sqrt"):
        raise FedLoraError(f"split must be 'B' or 'sqrt', got {split!r}")
    k = min(r, S.numel())
    s = S[:k].to(F64)
    a_sv, b_sv = (torch.ones_like(s), s) if split == "B" else (s.sqrt(), s.sqrt())
    A = torch.zeros(r, Vh.shape[1], dtype=F64)
    B = torch.zeros(U.shape[0], r, dtype=F64)
    A[:k] = a_sv[:, None] * Vh[:k].to(F64)
    B[:, :k] = U[:, :k].to(F64) * b_sv / scale
    extra = min(r, Vh.shape[1]) - k
    if extra > 0:
        A[k : k + extra] = orthonormal_rows(Vh[:k].to(F64), extra, pad_seed)
    return LoraFactors(A.to(dtype), B.to(dtype), scale)


def orthonormal_rows(V: Tensor, n: int, seed: int) -> Tensor:
    """`n` orthonormal rows (n, d), orthogonal to the orthonormal rows of V (k, d), from a
    seeded Gaussian draw (k + n <= d)."""
    d = V.shape[1]
    if V.shape[0] + n > d:
        raise FedLoraError(f"orthonormal_rows: {V.shape[0]} + {n} rows exceed dimension {d}")
    X = torch.randn(d, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    for _ in range(2):  # project twice: one Gram-Schmidt pass loses orthogonality
        X = X - V.T @ (V @ X)
    Q, _ = torch.linalg.qr(X)
    return Q.T.contiguous()


def stack(factors: list[LoraFactors], weights: list[float]) -> LoraFactors:
    """Exact factors of ``sum_k w_k delta_k`` by stacking (FLoRA): rank = sum of ranks."""
    G = torch.cat([w * f.scaled_B() for f, w in zip(factors, weights)], 1)
    H = torch.cat([f.A.to(F64) for f in factors], 0)
    return LoraFactors(H, G, 1.0)
