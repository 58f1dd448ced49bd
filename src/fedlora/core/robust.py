"""Update-norm defences shared by every engine: screen a round's updates before aggregation.

A client's *contribution* is what its training added to the model it was sent:
``||delta(update) - delta(start)||_F`` over all modules, computed from the factors
(`fedlora.core.norms`, r x r Grams, never the dense matrix). The start is the payload's adapter:

* a fresh init (``payload.adapter`` None, FLoRA every round, any strategy's first round) has
  B = 0 and a zero delta, so the contribution is the update's whole delta;
* LoRA-A2 uploads only its selected slots (``extras["slots"]``): the start is the payload's
  factors on those slots, the unselected ones contribute nothing;
* HetLoRA may prune its tail: the start keeps its full rank, so the dropped tail counts.

`NormBound` bounds the contribution absolutely (``max_norm``) and relative to the median
contribution of the round's *other* clients (``max_ratio``; leaving the client itself out
lets a round of two still reject one giant update). An update over its bound is rejected
or clipped toward its start (`fedlora.core.norms.clip_contribution`); the reason names the bound.
The privacy engine reuses `start_of` and the same norms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from fedlora.core.contract import ClientUpdate, FedLoraError, LoraFactors, Payload
from fedlora.core.norms import clip_contribution, contribution_norm, median

Start = dict[str, LoraFactors | None]


def start_of(update: ClientUpdate, payload: Payload) -> Start:
    """The factors `update` started from, module by module (None: fresh, a zero delta); for an
    upload of selected slots (LoRA-A2), the payload's factors on those slots."""
    sent = payload.adapter or {}
    slots = update.extras.get("slots")
    out: Start = {}
    for module in update.adapter:
        f0 = sent.get(module)
        if f0 is not None and isinstance(slots, Mapping) and module in slots:
            idx = torch.as_tensor(slots[module], dtype=torch.long)
            f0 = LoraFactors(f0.A[idx], f0.B[:, idx], f0.scale)
        out[module] = f0
    return out


@dataclass(frozen=True)
class NormBound:
    """Bounds on a client's contribution norm and what to do with an update over them.

    ``max_norm``: absolute bound (None: none). ``max_ratio``: bound as a multiple of the median
    contribution of the round's other clients (None: none; no bound when the client is alone
    or the others' median is 0). ``action``: ``"reject"`` drops the client for the round,
    ``"clip"`` moves its update toward its start until the norm equals the bound.
    """

    max_norm: float | None = None
    max_ratio: float | None = None
    action: Literal["reject", "clip"] = "reject"

    def __post_init__(self) -> None:
        for name in ("max_norm", "max_ratio"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise FedLoraError(f"NormBound.{name} must be a finite number > 0, got {v!r}")
        if self.action not in ("reject", "clip"):
            raise FedLoraError(f"NormBound.action must be 'reject' or 'clip', got {self.action!r}")

    @property
    def active(self) -> bool:
        return self.max_norm is not None or self.max_ratio is not None

    @property
    def needs_round(self) -> bool:
        """Whether the bound depends on the whole round (the relative one)."""
        return self.max_ratio is not None

    def limit(self, others: Sequence[float]) -> tuple[float, str] | None:
        """The tightest bound for a client whose round-mates have norms `others`, and how it
        was set (for the drop reason); None when nothing bounds it."""
        limits = []
        if self.max_norm is not None:
            limits.append((self.max_norm, f"robust.max_update_norm = {self.max_norm:g}"))
        ref = median(others) if self.max_ratio is not None else math.nan
        if self.max_ratio is not None and math.isfinite(ref) and ref > 0:
            limits.append(
                (
                    self.max_ratio * ref,
                    f"robust.max_norm_ratio = {self.max_ratio:g} x the median {ref:.3g} of the "
                    "round's other clients",
                )
            )
        return min(limits) if limits else None


@dataclass
class Screened:
    """A round after screening: the updates to aggregate (clipped ones replaced), and per
    client the contribution norm, the reason of each drop and the fraction kept of each clip."""

    kept: list[ClientUpdate] = field(default_factory=list)
    norms: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)


def screen_updates(
    items: Sequence[tuple[ClientUpdate, Start]],
    bound: NormBound,
    norms: Mapping[str, float] | None = None,
) -> Screened:
    """Apply `bound` to a round's (update, start) pairs, in order.

    `norms` may give contribution norms already computed (client id -> norm); the others are
    computed here. A single pair is screened by the absolute bound alone (a relative bound
    needs round-mates), which is how an engine screens a streamed round.
    """
    out = Screened()
    given = dict(norms or {})
    for u, start in items:
        n = given.get(u.client_id)
        out.norms[u.client_id] = n if n is not None else contribution_norm(u.adapter, start)
    values = list(out.norms.values())
    for i, (u, start) in enumerate(items):
        n = out.norms[u.client_id]
        lim = bound.limit(values[:i] + values[i + 1 :]) if bound.active else None
        if lim is None or n <= lim[0]:
            out.kept.append(u)
            continue
        limit, why = lim
        over = f"update norm {n:.4g} is over the bound {limit:.4g} ({why})"
        if bound.action == "reject":
            out.dropped[u.client_id] = over
            continue
        adapter, _, t = clip_contribution(u.adapter, start, limit)
        if adapter is None:
            out.dropped[u.client_id] = f"{over}; it cannot be clipped (its pruned tail alone is)"
            continue
        out.kept.append(ClientUpdate(u.client_id, adapter, u.num_examples, dict(u.extras)))
        out.clipped[u.client_id] = t
    return out
