"""fedlora.core.linalg against numpy's float64 dense SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import rel

from fedlora import FedLoraError
from fedlora.core.linalg import LowRankSum, factored_svd, gram_r, rank_r_factors, top_svd


def ill_conditioned(rng, m, n, rank, cond):
    """A rank-`rank` product with singular values spread over `cond` orders of magnitude."""
    U, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    V, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    s = np.logspace(0, -cond, rank)
    return U * s, V.T  # G (m, rank), H (rank, n)


@pytest.mark.parametrize("cond", [0, 6, 12])
def test_factored_svd_matches_dense_svd_on_ill_conditioned_products(cond):
    rng = np.random.default_rng()
    G, H = ill_conditioned(rng, 40, 30, 12, cond)
    U, S, Vh = factored_svd(torch.tensor(G), torch.tensor(H))
    ref = np.linalg.svd(G @ H, compute_uv=False)[:12]
    np.testing.assert_allclose(S.numpy(), ref, rtol=1e-8, atol=1e-14)
    assert rel((U * S).numpy() @ Vh.numpy(), G @ H) < 1e-12
    np.testing.assert_allclose(U.T.numpy() @ U.numpy(), np.eye(U.shape[1]), atol=1e-10)


def test_factored_svd_of_rank_deficient_stack():
    rng = np.random.default_rng()
    G, H = ill_conditioned(rng, 20, 25, 3, 0)
    # the same product three times: summed rank 9, true rank 3
    U, S, Vh = factored_svd(torch.tensor(np.hstack([G, G, -G])), torch.tensor(np.vstack([H, H, H])))
    assert S[3:].abs().max() < 1e-12 * S[0]
    assert rel((U * S).numpy() @ Vh.numpy(), G @ H) < 1e-12


@pytest.mark.parametrize("k", [3, 40])
def test_top_svd_randomized_and_exact_paths(k):
    rng = np.random.default_rng()
    G, H = ill_conditioned(rng, 300, 200, 200, 3)
    W = G @ H
    U, S, Vh = top_svd(torch.tensor(W), k)
    Ur, Sr, Vr = np.linalg.svd(W, full_matrices=False)
    np.testing.assert_allclose(S.numpy(), Sr[:k], rtol=1e-6)
    best = (Ur[:, :k] * Sr[:k]) @ Vr[:k]
    assert rel((U * S).numpy() @ Vh.numpy(), best) < 1e-5


def test_low_rank_sum_switches_to_dense_without_changing_the_result():
    rng = np.random.default_rng()
    shape = (30, 20)
    parts = [
        (rng.standard_normal((30, r)), rng.standard_normal((r, 20)), rng.random())
        for r in (3, 5, 9, 4)
    ]
    factored, dense = LowRankSum(shape, dense_rank=10_000), LowRankSum(shape, dense_rank=7)
    for G, H, w in parts:
        factored.add(torch.tensor(G), torch.tensor(H), w)
        dense.add(torch.tensor(G), torch.tensor(H), w)
    assert not factored.is_dense and dense.is_dense
    ref = sum(w * G @ H for G, H, w in parts)
    for acc in (factored, dense):
        assert rel(acc.dense().numpy(), ref) < 1e-12
        f = acc.factors()
        assert rel(f.delta().numpy(), ref) < 1e-10
        U, S, Vh = acc.svd(5)
        np.testing.assert_allclose(S.numpy(), np.linalg.svd(ref, compute_uv=False)[:5], rtol=1e-8)
    assert rel(factored.scale_(0.5).dense().numpy(), 0.5 * ref) < 1e-12


def test_low_rank_sum_of_nothing_and_of_zeros_is_exactly_zero():
    acc = LowRankSum((6, 4))
    assert acc.factors().rank == 0 and acc.dense().abs().max() == 0
    acc.add(torch.zeros(6, 2), torch.zeros(2, 4))
    assert acc.factors().rank == 0


def test_low_rank_sum_rejects_mismatched_factors():
    with pytest.raises(FedLoraError, match=r"do not make a \(6, 4\) matrix"):
        LowRankSum((6, 4)).add(torch.zeros(6, 2), torch.zeros(2, 5))


def test_rank_r_factors_pads_extra_slots_with_orthonormal_rows_that_can_learn():
    rng = np.random.default_rng()
    G, H = ill_conditioned(rng, 5, 10, 3, 0)
    W = G @ H  # rank 3, d_in = 10
    U, S, Vh = (torch.tensor(x) for x in np.linalg.svd(W, full_matrices=False))
    f = rank_r_factors(U[:, :3], S[:3], Vh[:3], 6, scale=0.5, split="sqrt", dtype=torch.float64)
    assert f.A.shape == (6, 10) and f.B.shape == (5, 6)
    assert rel(f.delta().numpy(), W) < 1e-12  # the padding leaves the delta unchanged
    assert f.B[:, 3:].abs().max() == 0
    pad = f.A[3:].numpy()
    V = np.linalg.svd(W)[2][:3]  # numpy's own right singular vectors
    np.testing.assert_allclose(pad @ pad.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(pad @ V.T, 0, atol=1e-12)
    # B's extra columns get a gradient (dL/dB = dL/dW A^T), unlike zero A rows
    target = rng.standard_normal((5, 10))
    grad_B = 0.5 * (f.delta().numpy() - target) @ f.A.numpy().T
    assert np.abs(grad_B[:, 3:]).max() > 1e-3
    # no room beyond d_in: those slots stay zero
    W2 = rng.standard_normal((5, 3))
    U2, S2, V2 = (torch.tensor(x) for x in np.linalg.svd(W2, full_matrices=False))
    g = rank_r_factors(U2, S2, V2, 5, scale=1.0, dtype=torch.float64)
    assert rel(g.delta().numpy(), W2) < 1e-12 and g.A[3:].abs().max() == 0


def test_gram_r_sees_a_condition_number_that_the_diagonal_of_r_hides():
    rng = np.random.default_rng()
    n = 20
    R_true = np.eye(n) - np.triu(np.ones((n, n)), 1)  # Kahan-like: unit diagonal
    Q, _ = np.linalg.qr(rng.standard_normal((200, n)))
    X = Q @ R_true
    assert np.linalg.cond(X) > 1e6  # numpy's own estimate; diag(R) suggests 1
    assert gram_r(torch.tensor(X)) is None
    H = rng.standard_normal((n, 30))
    U, S, Vh = factored_svd(torch.tensor(X), torch.tensor(H))
    np.testing.assert_allclose(S.numpy(), np.linalg.svd(X @ H, compute_uv=False)[:n], rtol=1e-9)


@pytest.mark.parametrize("cond", [0, 2])  # well-conditioned: the Gram/Cholesky path
def test_gram_r_is_the_r_of_a_qr(cond):
    rng = np.random.default_rng()
    G, _ = ill_conditioned(rng, 200, 30, 30, cond)
    R = gram_r(torch.tensor(G))
    assert R is not None
    Q = G @ np.linalg.inv(R.numpy())
    np.testing.assert_allclose(Q.T @ Q, np.eye(30), atol=1e-9)
    assert np.allclose(np.tril(R.numpy(), -1), 0)


def test_gram_r_refuses_ill_conditioned_and_rank_deficient_stacks():
    rng = np.random.default_rng()
    G, _ = ill_conditioned(rng, 200, 30, 30, 10)
    assert gram_r(torch.tensor(G)) is None
    X = rng.standard_normal((50, 4))
    assert gram_r(torch.tensor(np.hstack([X, X]))) is None


@pytest.mark.parametrize("cond", [3, 10])  # Gram path, and the Householder fallback
def test_factored_svd_top_k_matches_dense(cond):
    rng = np.random.default_rng()
    G, H = ill_conditioned(rng, 120, 90, 25, cond)
    U, S, Vh = factored_svd(torch.tensor(G), torch.tensor(H), k=7)
    Ur, Sr, Vr = np.linalg.svd(G @ H, full_matrices=False)
    assert U.shape == (120, 7) and Vh.shape == (7, 90)
    np.testing.assert_allclose(S.numpy(), Sr[:7], rtol=1e-8)
    assert rel((U * S).numpy() @ Vh.numpy(), (Ur[:, :7] * Sr[:7]) @ Vr[:7]) < 1e-8
