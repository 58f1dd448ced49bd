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
lets a round of two still reject one giant update). A client without round-mates (one usable
client in the round, or round-mates whose median is 0) is bounded by ``max_ratio`` times the
largest median accepted norm of the last `NormHistory.WINDOW` rounds (`NormHistory`, kept by
the server and checkpointed), and before any round was accepted by ``fallback_norm`` (an
absolute default, 100): a lone 1e6-scaled update never passes unbounded. An update over its
bound is rejected or clipped toward its start (`fedlora.core.norms.clip_contribution`); the
reason names the bound. The privacy engine reuses `start_of` and the same norms.

`WeightBound` bounds the aggregation weight a client's reported example count buys: a count
the server registered for the client (the experiment's partition size) caps it; a client the
server has no count for is capped at ``max_ratio`` x the median registered count (or, with
none registered, the median count reported in the round).
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
#: the bound of a lone client before any round was accepted (``robust.fallback_max_norm``)
DEFAULT_FALLBACK_NORM = 100.0


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
    contribution of the round's other clients (None: none); a client alone (or whose others'
    median is 0) gets ``max_ratio`` x the history's reference (`NormHistory.reference`), or
    ``fallback_norm`` when there is no history yet (None: unbounded). ``action``:
    ``"reject"`` drops the client for the round, ``"clip"`` moves its update toward its start
    until the norm equals the bound.
    """

    max_norm: float | None = None
    max_ratio: float | None = None
    action: Literal["reject", "clip"] = "reject"
    fallback_norm: float | None = DEFAULT_FALLBACK_NORM

    def __post_init__(self) -> None:
        for name in ("max_norm", "max_ratio", "fallback_norm"):
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

    def limit(
        self, others: Sequence[float], history: float | None = None
    ) -> tuple[float, str] | None:
        """The tightest bound for a client whose round-mates have norms `others` (`history`:
        the reference of earlier rounds, for a client without round-mates), and how it was
        set (for the drop reason); None when nothing bounds it."""
        limits = []
        if self.max_norm is not None:
            limits.append((self.max_norm, f"robust.max_update_norm = {self.max_norm:g}"))
        ratio = self.max_ratio
        ref = median(others) if ratio is not None else math.nan
        if ratio is not None and math.isfinite(ref) and ref > 0:
            why = f"the median {ref:.3g} of the round's other clients"
            limits.append((ratio * ref, f"robust.max_norm_ratio = {ratio:g} x {why}"))
        elif ratio is not None and history is not None and math.isfinite(history) and history > 0:
            why = f"{history:.3g}, the largest median accepted norm of recent rounds (no peers)"
            limits.append((ratio * history, f"robust.max_norm_ratio = {ratio:g} x {why}"))
        elif ratio is not None and self.fallback_norm is not None:
            why = f"{self.fallback_norm:g} (no round-mates and no earlier accepted round)"
            limits.append((self.fallback_norm, f"robust.fallback_max_norm = {why}"))
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
    history: float | None = None,
) -> Screened:
    """Apply `bound` to a round's (update, start) pairs, in order.

    `norms` may give contribution norms already computed (client id -> norm); the others are
    computed here. `history` (`NormHistory.reference`) bounds a client without round-mates.
    A single pair is screened by the absolute bound alone when the relative bound is off,
    which is how an engine screens a streamed round.
    """
    out = Screened()
    given = dict(norms or {})
    for u, start in items:
        n = given.get(u.client_id)
        out.norms[u.client_id] = n if n is not None else contribution_norm(u.adapter, start)
    values = list(out.norms.values())
    for i, (u, start) in enumerate(items):
        n = out.norms[u.client_id]
        lim = bound.limit(values[:i] + values[i + 1 :], history) if bound.active else None
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


@dataclass
class NormHistory:
    """The median accepted contribution norm of each of the last `WINDOW` rounds that accepted
    any (server state, checkpointed): the reference that bounds a client without round-mates."""

    WINDOW = 10
    medians: list[float] = field(default_factory=list)

    def reference(self) -> float | None:
        """The largest of the recent medians (None before any round was accepted)."""
        return max(self.medians) if self.medians else None

    def record(self, norms: Sequence[float]) -> None:
        m = median(norms)
        if math.isfinite(m) and m > 0:
            self.medians = [*self.medians, float(m)][-self.WINDOW :]

    def state_dict(self) -> dict[str, list[float]]:
        return {"medians": list(self.medians)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        got = state.get("medians", [])
        if not isinstance(got, list) or not all(
            isinstance(v, float) and math.isfinite(v) and v > 0 for v in got
        ):
            raise FedLoraError(f"norm history: expected finite positive floats, got {got!r}")
        self.medians = [float(v) for v in got][-self.WINDOW :]


@dataclass
class WeightBound:
    """How much aggregation weight a client's reported example count can buy.

    ``registered``: client id -> the count the server knows (the experiment's partition size;
    never a node's own declaration). A registered client weighs min(reported, registered). Any
    other client weighs min(reported, ceil(``max_ratio`` x M)), M the median registered count,
    or with none registered the median count reported in the round (``max_ratio`` None: no
    cap for them). Counts reach here checked (positive ints).
    """

    max_ratio: float | None = 4.0
    registered: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = self.max_ratio
        if v is not None and not (math.isfinite(v) and v >= 1):
            raise FedLoraError(f"WeightBound.max_ratio must be a finite number >= 1, got {v!r}")
        self._median = median(self.registered.values()) if self.registered else math.nan

    @property
    def needs_round(self) -> bool:
        """Whether the cap needs the round's reported counts (no count registered)."""
        return not self.registered and self.max_ratio is not None

    def bound(
        self, client_id: str, reported: int, round_counts: Sequence[int] = ()
    ) -> tuple[int, str | None]:
        """The weight of `client_id` reporting `reported`, and why it is lower (None: not)."""
        known = self.registered.get(client_id)
        if known is not None:
            if reported > known:
                return known, f"reported {reported} > the {known} registered for it"
            return reported, None
        if self.max_ratio is None:
            return reported, None
        m = self._median if self.registered else median(float(n) for n in round_counts)
        if not math.isfinite(m):
            return reported, None
        cap = max(1, math.ceil(self.max_ratio * m))
        if reported > cap:
            where = "registered" if self.registered else "reported in the round"
            return cap, (
                f"reported {reported} > robust.max_weight_ratio = {self.max_ratio:g} x the "
                f"median count {m:g} {where}"
            )
        return reported, None
