"""fedlora.core.norms against dense float64 numpy references on fresh random factors."""

import math

import numpy as np
import pytest
import torch

from fedlora.core.contract import LoraFactors
from fedlora.core.norms import (
    adapter_norm,
    clip_adapter,
    clip_factor,
    factors_sq_norm,
    lowrank_sq_norm,
    median,
)


def _factors(rng, d_out, d_in, r, scale):
    A = torch.tensor(rng.standard_normal((r, d_in)), dtype=torch.float32)
    B = torch.tensor(rng.standard_normal((d_out, r)), dtype=torch.float32)
    return LoraFactors(A, B, scale)


def _dense(f):
    return f.scale * f.B.double().numpy() @ f.A.double().numpy()


@pytest.mark.parametrize("seed", range(5))
def test_factored_norms_match_dense(seed):
    rng = np.random.default_rng(seed)
    d_out, d_in = rng.integers(3, 40, size=2)
    f = _factors(rng, d_out, d_in, int(rng.integers(1, 9)), float(rng.uniform(0.1, 4)))
    g = _factors(rng, d_out, d_in, int(rng.integers(1, 9)), float(rng.uniform(0.1, 4)))
    ref = np.linalg.norm(_dense(f), "fro") ** 2
    assert factors_sq_norm(f) == pytest.approx(ref, rel=1e-10)
    ref_diff = np.linalg.norm(_dense(f) - _dense(g), "fro") ** 2
    assert factors_sq_norm(f, minus=g) == pytest.approx(ref_diff, rel=1e-9)
    # a sum of three products with mixed signs
    h = _factors(rng, d_out, d_in, 3, 1.0)
    terms = [(f.scaled_B(), f.A), (-g.scaled_B(), g.A), (2.0 * h.scaled_B(), h.A)]
    dense = _dense(f) - _dense(g) + 2.0 * _dense(h)
    assert lowrank_sq_norm(terms) == pytest.approx(np.linalg.norm(dense, "fro") ** 2, rel=1e-9)


def test_difference_of_identical_factors_is_zero():
    rng = np.random.default_rng(11)
    f = _factors(rng, 20, 30, 4, 2.0)
    assert factors_sq_norm(f, minus=f) == pytest.approx(0.0, abs=1e-9 * factors_sq_norm(f))


def test_adapter_norm_and_clip_match_dense():
    rng = np.random.default_rng(3)
    ad = {
        "q": _factors(rng, 16, 24, 4, 2.0),
        "v": _factors(rng, 8, 24, 2, 0.5),
    }
    dense = {m: _dense(f) for m, f in ad.items()}
    ref = math.sqrt(sum(np.sum(d**2) for d in dense.values()))
    assert adapter_norm(ad) == pytest.approx(ref, rel=1e-10)
    clipped, norm, factor = clip_adapter(ad, ref / 4)
    assert norm == pytest.approx(ref, rel=1e-10)
    assert factor == pytest.approx(0.25, rel=1e-9)
    for m, f in clipped.items():
        np.testing.assert_allclose(_dense(f), dense[m] / 4, rtol=1e-5, atol=1e-6)
    assert adapter_norm(clipped) == pytest.approx(ref / 4, rel=1e-6)
    same, _, factor = clip_adapter(ad, 2 * ref)
    assert factor == 1.0 and all(same[m] is ad[m] for m in ad)


def test_adapter_norm_minus_absent_module_counts_whole():
    rng = np.random.default_rng(4)
    ad = {"q": _factors(rng, 5, 6, 2, 1.0), "k": _factors(rng, 5, 6, 2, 1.0)}
    g = {"q": _factors(rng, 5, 6, 3, 1.0)}
    ref = np.sum((_dense(ad["q"]) - _dense(g["q"])) ** 2) + np.sum(_dense(ad["k"]) ** 2)
    assert adapter_norm(ad, minus=g) == pytest.approx(math.sqrt(ref), rel=1e-9)


def test_clip_factor_and_median():
    assert clip_factor(2.0, 1.0) == 0.5
    assert clip_factor(0.5, 1.0) == 1.0
    assert clip_factor(0.0, 0.0) == 1.0
    with pytest.raises(ValueError):
        clip_factor(1.0, -1.0)
    assert median([3.0, 1.0, float("nan"), 2.0]) == 2.0
    assert median([4.0, 1.0]) == 2.5
    assert math.isnan(median([]))
