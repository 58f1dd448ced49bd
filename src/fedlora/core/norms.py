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

from fedlora.core.contract import Adapter, LoraFactors

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


# -- a client's contribution: its delta minus the delta it started from ----------------------


def contribution_norm(
    adapter: Mapping[str, LoraFactors], start: Mapping[str, LoraFactors | None] | None
) -> float:
    """``||delta(adapter) - delta(start)||_F`` over all modules: what a client's training
    added to the model it was sent. A module with no start (fresh init, B = 0) counts whole."""
    return adapter_norm(adapter, {m: f for m, f in (start or {}).items() if f is not None})


def move_toward(f: LoraFactors, f0: LoraFactors | None, t: float) -> LoraFactors:
    """Factors a fraction `t` of the way from the start `f0` to the trained `f`.

    With no start, or a start with B = 0 (a fresh init: its delta is zero), only B is scaled, so
    the delta is exactly ``t * delta(f)``. Otherwise A and ``scale * B`` are interpolated on
    the first ``f.rank`` slots (a client may have pruned its tail, HetLoRA); when one factor
    was frozen (FFA-LoRA, LoRA-A2) the contribution is then exactly ``t`` times the full one.
    The result keeps `f`'s rank, scale and dtype, so the strategy accepts it like `f`.
    """
    if f0 is None or not bool(f0.B.any()):
        return LoraFactors(f.A, f.B * t, f.scale)
    k = f.rank
    a0, g0 = f0.A[:k].to(F64), f0.scaled_B()[:, :k]
    a = a0 + t * (f.A.to(F64) - a0)
    g = g0 + t * (f.scaled_B() - g0)
    return LoraFactors(a.to(f.A.dtype), (g / f.scale).to(f.B.dtype), f.scale)


def clip_contribution(
    adapter: Mapping[str, LoraFactors],
    start: Mapping[str, LoraFactors | None] | None,
    max_norm: float,
    *,
    iters: int = 60,
) -> tuple[Adapter | None, float, float]:
    """Move an update toward its start until its contribution norm is at most `max_norm`.

    Returns (clipped adapter, contribution norm before clipping, fraction t kept). ``t`` is
    ``max_norm / norm`` where the contribution is linear in t (see `move_toward`), else found by
    bisection on the norm, which is continuous in t. The adapter is returned unchanged when no
    clipping is needed; the clipped norm is within float32 rounding (1e-5 relative) of
    `max_norm` where the update is float32. None when even t = 0 exceeds the bound (a pruned
    client's dropped tail alone is too large): the update cannot be clipped, only rejected.
    """
    clip_factor(0.0, max_norm)  # validates max_norm
    start = {m: f for m, f in (start or {}).items() if f is not None}

    def at(t: float) -> tuple[Adapter, float]:
        moved = {m: move_toward(f, start.get(m), t) for m, f in adapter.items()}
        return moved, contribution_norm(moved, start)

    norm = contribution_norm(adapter, start)
    if norm <= max_norm:
        return dict(adapter), norm, 1.0
    t = max_norm / norm
    moved, n = at(t)
    if abs(n - max_norm) <= 1e-5 * max_norm:  # linear in t, up to float32 rounding
        return moved, norm, t
    moved, n = at(0.0)
    if n > max_norm:
        return None, norm, 0.0
    lo, hi, best = 0.0, 1.0, moved  # norm(lo) <= max_norm < norm(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        moved, n = at(mid)
        if n <= max_norm:
            lo, best = mid, moved
        else:
            hi = mid
    return best, norm, lo
