"""Frobenius norms and clipping of LoRA deltas, computed from the factors.

The norm of a module's effective delta ``scale * B @ A`` (or of a sum of such products, e.g. a
client's delta minus the global one it started from) never needs the d_out x d_in matrix:

    || sum_i G_i @ H_i ||_F^2 = sum_ij < G_i^T G_j , H_j H_i^T >  =  sum((G^T G) * (H H^T))

with G = [G_1 ... G_k] (d_out, R) and H = [H_1; ...; H_k] (R, d_in) stacked, so the cost is two
R x R Gram matrices in float64. These are the primitives that robustness bounds (rejecting or
clipping oversized client updates) and differential privacy (clipping each client's
contribution) share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from fedlora.contract import Adapter, LoraFactors

F64 = torch.float64


def lowrank_sq_norm(terms: Sequence[tuple[Tensor, Tensor]]) -> float:
    """Squared Frobenius norm of ``sum_i G_i @ H_i`` from its factors, in float64.

    Each term is (G_i (d_out, r_i), H_i (r_i, d_in)); scales and signs belong in G_i.
    """
    terms = [(G, H) for G, H in terms if G.shape[1] > 0]
    if not terms:
        return 0.0
    G = torch.cat([g.to(F64) for g, _ in terms], dim=1)
    H = torch.cat([h.to(F64) for _, h in terms], dim=0)
    # <G^T G, H H^T> is exact in exact arithmetic; clamp the rounding of a ~zero sum
    return max(float(((G.T @ G) * (H @ H.T)).sum()), 0.0)


def factors_sq_norm(f: LoraFactors, minus: LoraFactors | None = None) -> float:
    """``||f.scale * f.B @ f.A - minus.scale * minus.B @ minus.A||_F^2`` (minus optional)."""
    terms = [(f.scaled_B(), f.A)]
    if minus is not None:
        terms.append((-minus.scaled_B(), minus.A))
    return lowrank_sq_norm(terms)


def adapter_norm(
    adapter: Mapping[str, LoraFactors], minus: Mapping[str, LoraFactors] | None = None
) -> float:
    """Global Frobenius norm over all modules of an adapter's effective delta (optionally of its
    difference from `minus`, module by module; a module absent from `minus` counts whole)."""
    total = 0.0
    for m, f in adapter.items():
        total += factors_sq_norm(f, None if minus is None else minus.get(m))
    return math.sqrt(total)


def clip_factor(norm: float, max_norm: float) -> float:
    """The multiplier ``min(1, max_norm / norm)`` that brings `norm` within `max_norm`."""
    if max_norm < 0 or not math.isfinite(max_norm):
        raise ValueError(f"max_norm must be a finite number >= 0, got {max_norm!r}")
    return 1.0 if norm <= max_norm else (max_norm / norm if norm > 0 else 1.0)


def scale_adapter(adapter: Mapping[str, LoraFactors], factor: float) -> Adapter:
    """Every module's delta multiplied by `factor` (B scaled, A unchanged: delta is linear in B)."""
    return {m: LoraFactors(f.A, f.B * factor, f.scale) for m, f in adapter.items()}


def clip_adapter(
    adapter: Mapping[str, LoraFactors], max_norm: float
) -> tuple[Adapter, float, float]:
    """Clip an adapter's global delta norm to `max_norm`.

    Returns (clipped adapter, norm before clipping, factor applied). The adapter is returned
    unchanged (same objects) when no clipping is needed.
    """
    norm = adapter_norm(adapter)
    factor = clip_factor(norm, max_norm)
    return (dict(adapter) if factor == 1.0 else scale_adapter(adapter, factor)), norm, factor


def median(values: Iterable[float]) -> float:
    """Median of finite values (nan for none): the reference of relative norm bounds."""
    xs = sorted(v for v in values if math.isfinite(v))
    if not xs:
        return math.nan
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
