"""Confidence intervals and paired tests for evaluation metrics (numpy only).

Every metric fedlora reports is a function of sums over evaluation examples: example i
contributes a row of terms ``x_i`` (K numbers) and the metric is ``finish(sum_i x_i)``. A
token-weighted loss has ``x_i = (nll_i, tokens_i)`` and ``finish(s) = s[0] / s[1]``; accuracy
has ``(correct_i, 1)``; macro-F1 has per-class true/false positive and false negative
indicators (`fedlora.clients.evaluate.metric_terms` builds them). That one form lets a bootstrap
resample examples by weighting rows with multinomial counts (``W @ X``), and lets a paired
permutation test swap two methods' rows example by example, without re-running the metric
code per resample.

Several seeds are strata: ``terms`` is a list with one ``(n_s, K)`` array per seed, the
statistic is the mean over seeds of the per-seed metric, and resampling (or swapping) stays
inside each seed, so the examples of one seed are only ever paired with themselves.

* `bootstrap_ci`: percentile bootstrap CI of the statistic;
* `paired_bootstrap_ci`: percentile bootstrap CI of ``stat(a) - stat(b)`` on shared examples;
* `paired_permutation_test`: two-sided p-value of that difference under the null that the two
  methods are exchangeable on every example (exact enumeration when it is small enough);
* `t_interval`: Student-t CI of a mean over a few independent values (e.g. seeds).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

#: ``finish(sums)`` maps sums of shape (..., K) to metric values of shape (...)
Finish = Callable[[np.ndarray], np.ndarray]
Terms = np.ndarray | Sequence[np.ndarray]

_CHUNK = 512  # resamples per block (bounds memory at _CHUNK x n per stratum)


def ratio(sums: np.ndarray) -> np.ndarray:
    """``sums[..., 0] / sums[..., 1]``: a mean (terms ``(x_i, 1)``) or a weighted mean (terms
    ``(w_i x_i, w_i)``); NaN where the denominator is 0."""
    num, den = sums[..., 0], sums[..., 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def _strata(terms: Terms) -> list[np.ndarray]:
    arrays = [terms] if isinstance(terms, np.ndarray) else list(terms)
    out = []
    for x in arrays:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"terms must be non-empty (n, K) arrays, got shape {x.shape}")
        out.append(x)
    if not out:
        raise ValueError("no terms")
    return out


def statistic(terms: Terms, finish: Finish) -> float:
    """The statistic on the data as observed: mean over strata of ``finish(sum of rows)``."""
    return float(np.mean([finish(x.sum(0)) for x in _strata(terms)]))


def _quantiles(values: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    lo, hi = np.quantile(values, [a, 1 - a])
    return (float(lo), float(hi))


def _boot_values(strata_a, strata_b, finish, n_boot: int, seed: int) -> np.ndarray:
    """Per resample: mean over strata of finish(W a) (minus finish(W b) when b is given),
    with the same multinomial counts W for a and b."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for s, xa in enumerate(strata_a):
        n = xa.shape[0]
        for start in range(0, n_boot, _CHUNK):
            m = min(_CHUNK, n_boot - start)
            w = rng.multinomial(n, np.full(n, 1.0 / n), size=m).astype(np.float64)
            v = finish(w @ xa)
            if strata_b is not None:
                v = v - finish(w @ strata_b[s])
            total[start : start + m] += v
    return total / len(strata_a)


def bootstrap_ci(
    terms: Terms, finish: Finish = ratio, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic` (examples resampled with replacement within
    each stratum); NaN bounds when no resample gives a finite value."""
    strata = _strata(terms)
    return _quantiles(_boot_values(strata, None, finish, n_boot, seed), level)


def _paired(a: Terms, b: Terms) -> tuple[list[np.ndarray], list[np.ndarray]]:
    sa, sb = _strata(a), _strata(b)
    if len(sa) != len(sb) or any(x.shape != y.shape for x, y in zip(sa, sb)):
        raise ValueError(
            "paired terms must have the same strata and shapes: "
            f"{[x.shape for x in sa]} vs {[y.shape for y in sb]}"
        )
    return sa, sb


def paired_bootstrap_ci(
    a: Terms,
    b: Terms,
    finish: Finish = ratio,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(a) - statistic(b)``, resampling the shared
    examples (row i of `a` and of `b` are the same example) jointly."""
    sa, sb = _paired(a, b)
    return _quantiles(_boot_values(sa, sb, finish, n_boot, seed), level)


def _swap_difference(xa, xb, masks, finish) -> np.ndarray:
    """finish(a') - finish(b') per mask row, where a' takes b's row i where the mask is 1."""
    d = xb - xa
    moved = masks @ d
    sa, sb = xa.sum(0), xb.sum(0)
    return finish(sa + moved) - finish(sb - moved)


def paired_permutation_test(
    a: Terms,
    b: Terms,
    finish: Finish = ratio,
    *,
    n_perm: int = 10000,
    seed: int = 0,
) -> float:
    """Two-sided p-value of ``statistic(a) - statistic(b)`` under the null that, example by
    example, the two methods' rows are exchangeable (a random swap per example).

    Exact (every one of the 2^N swap patterns) when 2^N <= `n_perm`, N the number of examples
    over all strata; otherwise `n_perm` random patterns with the observed one counted in
    (``(1 + #{|T*| >= |T|}) / (1 + n_perm)``), so a p-value is never 0.
    """
    sa, sb = _paired(a, b)
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    observed = float(np.mean([finish(x.sum(0)) - finish(y.sum(0)) for x, y in zip(sa, sb)]))
    if not math.isfinite(observed):
        return math.nan
    sizes = [x.shape[0] for x in sa]
    total_n = sum(sizes)
    # ties (e.g. |T*| = |T| from a discrete metric) count as extreme: relative tolerance
    tol = 1e-9 * max(1.0, abs(observed))
    if total_n <= 20 and 2**total_n <= n_perm:
        masks = np.array(list(itertools.product((0.0, 1.0), repeat=total_n)))
        values = _stratified_swaps(sa, sb, masks, sizes, finish)
        return float(np.mean(np.abs(values) >= abs(observed) - tol))
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, n_perm, _CHUNK):
        m = min(_CHUNK, n_perm - start)
        masks = rng.integers(0, 2, size=(m, total_n)).astype(np.float64)
        values = _stratified_swaps(sa, sb, masks, sizes, finish)
        extreme += int(np.sum(np.abs(values) >= abs(observed) - tol))
    return (1 + extreme) / (1 + n_perm)


def _stratified_swaps(sa, sb, masks, sizes, finish) -> np.ndarray:
    out = np.zeros(masks.shape[0])
    offset = 0
    for xa, xb, n in zip(sa, sb, sizes):
        out += _swap_difference(xa, xb, masks[:, offset : offset + n], finish)
        offset += n
    return out / len(sa)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t CI of the mean of independent `values` (NaN bounds for fewer than 2)."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return (math.nan, math.nan)
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, v.size - 1)) * float(v.std(ddof=1)) / math.sqrt(v.size)
    m = float(v.mean())
    return (m - half, m + half)
