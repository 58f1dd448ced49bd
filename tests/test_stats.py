"""fedlora.core.stats: bootstrap coverage on synthetic data with a known mean, paired permutation
p-values against exact enumeration written here and against scipy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from fedlora.clients.evaluate import metric_terms
from fedlora.core.stats import (
    bootstrap_ci,
    paired_bootstrap_ci,
    paired_permutation_test,
    ratio,
    statistic,
    t_interval,
)


def _mean_terms(x):
    return np.stack([x, np.ones_like(x)], axis=1)


def _coverage(draw, truth, reps, **kw):
    hits = 0
    for r in range(reps):
        lo, hi = draw(np.random.default_rng([11, r]), r, **kw)
        hits += lo <= truth <= hi
    return hits / reps


def test_bootstrap_ci_covers_a_known_mean_at_the_stated_rate():
    # skewed data (exponential, mean 2): the percentile bootstrap of n=100 should cover the
    # true mean about 95% of the time; 400 data sets -> binomial sd ~ 0.011
    def draw(rng, r):
        x = rng.exponential(2.0, size=100)
        return bootstrap_ci(_mean_terms(x), ratio, n_boot=500, seed=r)

    cov = _coverage(draw, 2.0, 400)
    assert 0.91 <= cov <= 0.985, cov


def test_bootstrap_ci_of_a_token_weighted_ratio_covers_the_true_ratio():
    # per-example (summed nll, tokens): the population token-weighted loss is mu
    mu = 3.0

    def draw(rng, r):
        ntok = rng.integers(1, 30, size=150).astype(float)
        nll = ntok * mu + rng.normal(0, 1.5, size=150) * np.sqrt(ntok)
        return bootstrap_ci(np.stack([nll, ntok], 1), ratio, n_boot=500, seed=r)

    cov = _coverage(draw, mu, 300)
    assert 0.90 <= cov <= 0.99, cov


def test_bootstrap_ci_shrinks_with_n_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, 2000)
    lo, hi = bootstrap_ci(_mean_terms(x[:50]))
    lo2, hi2 = bootstrap_ci(_mean_terms(x))
    assert lo < x[:50].mean() < hi and lo2 < x.mean() < hi2
    # the width scales like 1/sqrt(n): 40x the data, about 1/6.3 the width
    assert 0.1 < (hi2 - lo2) / (hi - lo) < 0.22


def test_stratified_statistic_is_the_mean_of_the_strata():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0])
    assert statistic([_mean_terms(a), _mean_terms(b)], ratio) == pytest.approx((2.0 + 15.0) / 2)


def _reference_exact_p(a, b, stat):
    """Two-sided p over every swap pattern, by brute force on the swapped lists."""
    obs = stat(a) - stat(b)
    n = len(a)
    extreme = 0
    for mask in itertools.product((False, True), repeat=n):
        a2 = [b[i] if m else a[i] for i, m in enumerate(mask)]
        b2 = [a[i] if m else b[i] for i, m in enumerate(mask)]
        extreme += abs(stat(a2) - stat(b2)) >= abs(obs) - 1e-12
    return extreme / 2**n


def test_paired_permutation_p_matches_exact_enumeration_for_a_mean():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, 11)
    b = a - 0.6 + rng.normal(0, 0.8, 11)  # a constructed difference of about +0.6

    def mean(v):
        return float(np.mean(v))

    want = _reference_exact_p(list(a), list(b), mean)
    got = paired_permutation_test(_mean_terms(a), _mean_terms(b), ratio, n_perm=4096)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < want < 0.2  # the constructed difference is visible but not certain


def test_paired_permutation_p_matches_exact_enumeration_for_a_token_weighted_ratio():
    rng = np.random.default_rng(2)
    tok = rng.integers(1, 9, 10).astype(float)
    na = tok * 2.0 + rng.normal(0, 1, 10)
    nb = tok * 2.4 + rng.normal(0, 1, 10)
    ea = list(zip(na, tok))
    eb = list(zip(nb, tok))

    def weighted(rows):
        return sum(r[0] for r in rows) / sum(r[1] for r in rows)

    want = _reference_exact_p(ea, eb, weighted)
    got = paired_permutation_test(np.stack([na, tok], 1), np.stack([nb, tok], 1), n_perm=2000)
    assert got == pytest.approx(want, abs=1e-12)


def test_paired_permutation_p_agrees_with_scipy():
    rng = np.random.default_rng(3)
    a = rng.normal(0, 1, 60)
    b = a - 0.25 + rng.normal(0, 1, 60)
    ref = sps.permutation_test(
        (a, b),
        lambda x, y: np.mean(x) - np.mean(y),
        permutation_type="samples",
        n_resamples=100_000,
        alternative="two-sided",
        random_state=0,
    ).pvalue
    got = paired_permutation_test(_mean_terms(a), _mean_terms(b), n_perm=100_000, seed=5)
    # both are Monte Carlo estimates of the same p: sd ~ sqrt(p(1-p)/1e5) < 0.0016
    assert abs(got - ref) < 0.006, (got, ref)
    assert 0.01 < ref < 0.5


def test_paired_permutation_p_is_uniformish_under_the_null():
    # exchangeable pairs: P(p < 0.05) should be about 0.05
    small = 0
    reps = 300
    for r in range(reps):
        rng = np.random.default_rng([5, r])
        base = rng.normal(0, 1, 40)
        a, b = base + rng.normal(0, 1, 40), base + rng.normal(0, 1, 40)
        small += paired_permutation_test(_mean_terms(a), _mean_terms(b), n_perm=400, seed=r) < 0.05
    assert 0.015 <= small / reps <= 0.095


def test_stratified_permutation_swaps_within_strata_exactly():
    rng = np.random.default_rng(4)
    a1, b1 = rng.normal(0, 1, 5), rng.normal(0.5, 1, 5)
    a2, b2 = rng.normal(3, 1, 4), rng.normal(3.2, 1, 4)
    # reference: both strata's swap patterns, statistic = mean over strata of the mean gaps
    obs = ((a1.mean() - b1.mean()) + (a2.mean() - b2.mean())) / 2
    extreme = 0
    for m in itertools.product((1.0, -1.0), repeat=9):
        m1, m2 = np.array(m[:5]), np.array(m[5:])
        t = (np.mean(m1 * (a1 - b1)) + np.mean(m2 * (a2 - b2))) / 2
        extreme += abs(t) >= abs(obs) - 1e-12
    got = paired_permutation_test(
        [_mean_terms(a1), _mean_terms(a2)], [_mean_terms(b1), _mean_terms(b2)], n_perm=512
    )
    assert got == pytest.approx(extreme / 2**9, abs=1e-12)


def test_paired_bootstrap_ci_of_the_difference_covers_the_true_shift():
    delta = 0.3

    def draw(rng, r):
        shared = rng.normal(0, 2, 80)  # per-example difficulty, shared by both methods
        a = shared + delta + rng.normal(0, 0.5, 80)
        b = shared + rng.normal(0, 0.5, 80)
        return paired_bootstrap_ci(_mean_terms(a), _mean_terms(b), n_boot=400, seed=r)

    assert 0.90 <= _coverage(draw, delta, 300) <= 0.985
    # pairing removes the shared difficulty: the CI is far narrower than the unpaired one
    rng = np.random.default_rng(9)
    shared = rng.normal(0, 2, 80)
    a, b = shared + delta + rng.normal(0, 0.5, 80), shared + rng.normal(0, 0.5, 80)
    lo, hi = paired_bootstrap_ci(_mean_terms(a), _mean_terms(b))
    ua, ub = bootstrap_ci(_mean_terms(a)), bootstrap_ci(_mean_terms(b))
    assert hi - lo < 0.5 * ((ua[1] - ua[0]) + (ub[1] - ub[0]))


def test_paired_inputs_must_match():
    with pytest.raises(ValueError, match="same strata and shapes"):
        paired_permutation_test(_mean_terms(np.ones(3)), _mean_terms(np.ones(4)))


def test_t_interval_against_the_textbook_formula():
    v = [1.0, 2.0, 4.0]
    m, s = np.mean(v), np.std(v, ddof=1)
    half = 4.302652729749464 * s / np.sqrt(3)  # t_{0.975, 2}
    assert t_interval(v) == pytest.approx((m - half, m + half))
    assert all(np.isnan(t_interval([1.0])))


def test_macro_f1_terms_bootstrap_matches_a_direct_resample():
    # the W @ X form of macro-F1 equals macro-F1 recomputed on the resampled label lists
    rng = np.random.default_rng(6)
    labels = ["a", "b", "c", "d"]
    t = [labels[i] for i in rng.integers(0, 4, 30)]
    p = [x if rng.random() < 0.6 else labels[rng.integers(0, 4)] for x in t]
    cols = {"task": ["x"] * 30, "label": t, "pred": p}
    terms, finish, _ = metric_terms(cols, "f1")
    for r in range(20):
        idx = np.random.default_rng(r).integers(0, 30, 30)
        counts = np.bincount(idx, minlength=30).astype(float)
        tt, pp = [t[i] for i in idx], [p[i] for i in idx]
        classes = sorted(set(tt) | set(pp))
        f1s = []
        for c in classes:
            tp = sum(a == c and b == c for a, b in zip(tt, pp))
            fp = sum(a != c and b == c for a, b in zip(tt, pp))
            fn = sum(a == c and b != c for a, b in zip(tt, pp))
            f1s.append(2 * tp / (2 * tp + fp + fn))
        assert float(finish(counts @ terms)) == pytest.approx(np.mean(f1s))
