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
lets a round of two still reject one giant update). The privacy engine reuses `start_of` and
the same norms. An update over its bound is rejected or clipped toward its start
(`fedlora.core.norms.clip_contribution`); the reason names the bound.

**The lone bound** (a client without round-mates: one usable client in the round, or
round-mates whose median is 0), `NormHistory.lone_limit`: a client alone could otherwise set
its own bound, since its accepted norm becomes the reference of the next round (issue 27: 99
-> 1,881 -> 35,740 -> 679,000, x19 a round). So the lone bound L_t of round t is

* round 1 (no accepted round yet): ``fallback_norm`` (the first-round value; engines derive
  it from the model: `MODEL_NORM_FRACTION` x the Frobenius norm of the adapted modules' base
  weights, `first_round_norm`);
* later: min(``max_ratio`` x the largest median accepted norm of the last
  `NormHistory.WINDOW` rounds, ``growth`` x L_{t-1}, ``max_growth`` x L_1).

A lone client that submits just under its bound every round is accepted at most L_1, 2 L_1,
4 L_1, 4 L_1, ... (defaults ``growth`` 2, ``max_growth`` 4): never above 4 x the first-round
value, over the whole run. The history is server state, checkpointed.

`WeightBound` bounds the aggregation weight a client's reported example count buys: a count
the server registered for the client (the experiment's partition size) caps it; a client the
server has no count for is capped at ``max_ratio`` x the median registered count (or, with
none registered, the median count reported in the round).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from fedlora.core.contract import ClientUpdate, FedLoraError, LoraFactors, Payload
from fedlora.core.norms import clip_contribution, contribution_norm, median

Start = dict[str, LoraFactors | None]
#: the bound of a lone client before any round was accepted, for a bare `NormBound` (engines
#: derive it from the model: `first_round_norm`)
DEFAULT_FALLBACK_NORM = 100.0
#: the first-round lone bound as a fraction of the adapted base weights' Frobenius norm: a
#: client whose first round changes the adapted weights by a quarter of their norm is not
#: fine-tuning them (an honest `tiny` client: 0.06-0.18 against 0.68)
MODEL_NORM_FRACTION = 0.25
#: the lone bound's growth: per round, and over the whole run (x its first-round value)
DEFAULT_LONE_GROWTH = 2.0
DEFAULT_LONE_MAX_GROWTH = 4.0


def first_round_norm(base_norm: float) -> float:
    """The first-round lone bound a model implies: `MODEL_NORM_FRACTION` x `base_norm`, the
    Frobenius norm of its adapted modules' base weights (all of them together)."""
    value = MODEL_NORM_FRACTION * float(base_norm)
    if not (math.isfinite(value) and value > 0):
        raise FedLoraError(f"the adapted base weights' norm is {base_norm!r}: not a usable bound")
    return value


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
    median is 0) gets the lone bound (`NormHistory.lone_limit`, see the module docstring):
    ``fallback_norm`` in the first round (None: unbounded then), then ``max_ratio`` x the
    history's reference, at most ``growth`` x the previous round's lone bound and
    ``max_growth`` x ``fallback_norm`` (None: no such cap). ``action``: ``"reject"`` drops the
    client for the round, ``"clip"`` moves its update toward its start until the norm equals
    the bound.
    """

    max_norm: float | None = None
    max_ratio: float | None = None
    action: Literal["reject", "clip"] = "reject"
    fallback_norm: float | None = DEFAULT_FALLBACK_NORM
    growth: float | None = DEFAULT_LONE_GROWTH
    max_growth: float | None = DEFAULT_LONE_MAX_GROWTH

    def __post_init__(self) -> None:
        for name in ("growth", "max_growth"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 1):
                raise FedLoraError(f"NormBound.{name} must be a finite number >= 1, got {v!r}")
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
        self, others: Sequence[float], lone: tuple[float, str] | None = None
    ) -> tuple[float, str] | None:
        """The tightest bound for a client whose round-mates have norms `others` (`lone`: the
        lone bound, `NormHistory.lone_limit`, for a client without round-mates; None: the
        first-round value), and how it was set (for the drop reason); None when nothing
        bounds it."""
        limits = []
        if self.max_norm is not None:
            limits.append((self.max_norm, f"robust.max_update_norm = {self.max_norm:g}"))
        ratio = self.max_ratio
        ref = median(others) if ratio is not None else math.nan
        if ratio is not None and math.isfinite(ref) and ref > 0:
            why = f"the median {ref:.3g} of the round's other clients"
            limits.append((ratio * ref, f"robust.max_norm_ratio = {ratio:g} x {why}"))
        elif ratio is not None:
            got = lone if lone is not None else NormHistory().lone_limit(self)
            if got is not None:
                limits.append(got)
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
    history: NormHistory | None = None,
) -> Screened:
    """Apply `bound` to a round's (update, start) pairs, in order.

    `norms` may give contribution norms already computed (client id -> norm); the others are
    computed here. `history` (the server's; None: a first round) sets the lone bound of a
    client without round-mates (`NormHistory.lone_limit`).
    A single pair is screened by the absolute bound alone when the relative bound is off,
    which is how an engine screens a streamed round.
    """
    out = Screened()
    given = dict(norms or {})
    for u, start in items:
        n = given.get(u.client_id)
        out.norms[u.client_id] = n if n is not None else contribution_norm(u.adapter, start)
    values = list(out.norms.values())
    lone = (history or NormHistory()).lone_limit(bound)
    for i, (u, start) in enumerate(items):
        n = out.norms[u.client_id]
        lim = bound.limit(values[:i] + values[i + 1 :], lone) if bound.active else None
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
    """The server's memory of accepted norms (server state, checkpointed): the median accepted
    contribution norm of each of the last `WINDOW` rounds that accepted any (the reference),
    and the lone bound in force in the latest round (``lone``, for the growth cap)."""

    WINDOW = 10
    medians: list[float] = field(default_factory=list)
    lone: float | None = None

    def reference(self) -> float | None:
        """The largest of the recent medians (None before any round was accepted)."""
        return max(self.medians) if self.medians else None

    def lone_limit(self, bound: NormBound) -> tuple[float, str] | None:
        """The bound of a client without round-mates this round, and how it was set (None:
        unbounded: no relative bound, or no first-round value and no history)."""
        ratio, first, ref = bound.max_ratio, bound.fallback_norm, self.reference()
        if ratio is None:
            return None
        if ref is None:
            if first is None:
                return None
            why = f"{first:.4g}, the first-round value (no round-mates and no earlier round)"
            return first, f"robust.fallback_max_norm = {why}"
        recent = f"{ref:.3g}, the largest median accepted norm of recent rounds (no round-mates)"
        limits = [(ratio * ref, f"robust.max_norm_ratio = {ratio:g} x {recent}")]
        if bound.growth is not None and self.lone is not None:
            why = f"the previous round's lone bound {self.lone:.4g}"
            limits.append(
                (bound.growth * self.lone, f"robust.lone_growth = {bound.growth:g} x {why}")
            )
        if bound.max_growth is not None and first is not None:
            why = f"the first-round value {first:.4g}"
            limits.append(
                (bound.max_growth * first, f"robust.lone_max_growth = {bound.max_growth:g} x {why}")
            )
        return min(limits)

    def end_round(self, bound: NormBound, norms: Sequence[float]) -> None:
        """After a round: keep the lone bound that was in force, then `record` the accepted
        (unclipped) norms `norms`."""
        lim = self.lone_limit(bound)
        if lim is not None:
            self.lone = float(lim[0])
        self.record(norms)

    def record(self, norms: Sequence[float]) -> None:
        m = median(norms)
        if math.isfinite(m) and m > 0:
            self.medians = [*self.medians, float(m)][-self.WINDOW :]

    def state_dict(self) -> dict[str, Any]:
        return {"medians": list(self.medians), "lone": self.lone}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        got, lone = state.get("medians", []), state.get("lone")
        if not isinstance(got, list) or not all(_positive(v) for v in got):
            raise FedLoraError(f"norm history: expected finite positive floats, got {got!r}")
        if lone is not None and not _positive(lone):
            raise FedLoraError(f"norm history: lone bound {lone!r} is not a finite float > 0")
        self.medians = [float(v) for v in got][-self.WINDOW :]
        self.lone = None if lone is None else float(lone)


def _positive(v: object) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


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
