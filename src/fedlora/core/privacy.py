"""Differential privacy for federated LoRA: clipping, seeded Gaussian noise and accounting.

Two modes (``[privacy] mode``):

* ``"central"`` (client-level DP, DP-FedAvg, McMahan et al., ICLR 2018): the server clips each
  sampled client's contribution to `clip_norm` in the quantity its strategy releases, averages
  with the fixed denominator K (clients sampled per round) and adds Gaussian noise of std
  ``noise_multiplier * clip_norm / K`` where the strategy holds the aggregate. The clipped
  quantity is the client's *update*: what it sends minus what it received (its start), so
  ``contribution_k = start_k + c_k (sent_k - start_k)``, ``c_k = min(1, C / ||sent_k - start_k||)``;
  the start is server state and public. Which quantity each strategy releases is
  ``Strategy.dp_released`` (see docs/privacy.md):

  - ``"factors"`` (fedit, zero_pad, hetlora): the factor vector (A, scale * B) of every module;
  - ``"B"`` (ffa_lora): scale * B only, A is public;
  - ``"trained"`` (lora_a2): the uploaded slots of the factor trained this round;
  - ``"delta"`` (flexlora, flora): the effective delta ``scale * B @ A``, whose norm comes from
    r x r Grams (`fedlora.core.norms`), never from the dense matrix. Noise on a delta is dense.

* ``"local"`` (sample-level DP-SGD on each client, `fedlora.clients.dp_sgd`): per-example gradient
  clipping and noise on the client's trainable LoRA factors; each client's epsilon
  accumulates over the rounds it takes part in.

Noise comes from a `torch.Generator` seeded by (seed, round, tensor name): a run is
reproducible and resumes exactly, which also means anyone who knows the seed can remove the
noise; keep the seed secret in a real deployment. Accounting uses Opacus's RDP or PRV
accountant (`epsilon`), not a hand-written bound; this module imports torch only and loads
Opacus when an epsilon is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedlora.core.contract import (
    Adapter,
    ClientUpdate,
    FedLoraError,
    LoraFactors,
    init_lora,
    module_seed,
)
from fedlora.core.norms import adapter_norm, clip_factor

F64 = torch.float64
MODES = ("none", "central", "local")
ACCOUNTANTS = ("rdp", "prv")

# (noise_multiplier, sample_rate, steps): one entry of a subsampled Gaussian mechanism history
Step = tuple[float, float, int]


# -- accounting ------------------------------------------------------------------------------


def _accountant(name: str):
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError:  # pragma: no cover - opacus is in the `privacy` extra (and `all`)
        raise FedLoraError(
            "privacy: the accountant needs opacus; pip install 'fedlora[privacy]'"
        ) from None
    if name not in ACCOUNTANTS:
        raise FedLoraError(f"privacy.accountant: {name!r} is not one of {', '.join(ACCOUNTANTS)}")
    return RDPAccountant() if name == "rdp" else PRVAccountant()


def epsilon(history: Sequence[Step], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of the composition of subsampled Gaussian mechanisms in `history` at `delta`,
    from Opacus's accountant (``"rdp"``: Mironov et al. 2019; ``"prv"``: Gopi et al. 2021).
    0 for an empty history; inf when a noise multiplier is 0."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0 and q > 0]
    if not history:
        return 0.0
    if any(s <= 0 for s, _, _ in history):
        return math.inf
    acc = _accountant(accountant)
    acc.history = _merged(history)
    import warnings

    with warnings.catch_warnings():  # PRV's log(0) at q = 1 is handled inside it; RDP's
        warnings.simplefilter("ignore", RuntimeWarning)  # largest-alpha notice is a valid bound
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta))


def _merged(history: Sequence[Step]) -> list[Step]:
    """Consecutive entries with the same (sigma, q) merged into one (same composition)."""
    out: list[Step] = []
    for s, q, n in history:
        if out and out[-1][0] == s and out[-1][1] == q:
            out[-1] = (s, q, out[-1][2] + n)
        else:
            out.append((s, q, n))
    return out


def noise_multiplier_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier whose `steps`-fold subsampled Gaussian mechanism at rate
    `sample_rate` stays within (`target_epsilon`, `delta`) (Opacus's `get_noise_multiplier`)."""
    _accountant(accountant)
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # "optimal order is the largest alpha": a valid bound
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=min(1.0, sample_rate),
            steps=int(steps),
            accountant=accountant,
            epsilon_tolerance=0.01 * target_epsilon,
        )
    return float(sigma)


def local_sample_rate(n: int, batch_size: int) -> float:
    """DP-SGD's Poisson sampling rate on a client of n examples: expected batch
    ``min(batch_size, n)``."""
    return min(1.0, batch_size / n)


def local_steps(n: int, batch_size: int, steps: int, epochs: int | None) -> int:
    """DP-SGD steps of one client round: `steps`, or `epochs` passes of expected batches."""
    if epochs is None:
        return steps
    return epochs * math.ceil(n / min(batch_size, n))


def default_delta(population: int) -> float:
    """``1 / (10 n)``: below 1/n for n protected units (clients, or a client's examples)."""
    return 1.0 / (10.0 * max(1, int(population)))


@dataclass
class PrivacyLedger:
    """The run's privacy accounting, the same in every engine.

    Central mode: one history for the whole population (each round: noise multiplier,
    client sampling rate, 1 step). Local mode: a history per client, extended each round it
    is sent a payload by the DP-SGD steps its size implies (`record_local`: the server's own
    count, never what the client reports). `state_dict` / `load_state_dict` make a resumed run
    account exactly as an uninterrupted one.
    """

    mode: str
    noise_multiplier: float
    clip_norm: float
    delta: float
    accountant: str = "rdp"
    sample_rate: float = 1.0  # central: clients_per_round / num_clients
    history: list[Step] = field(default_factory=list)
    clients: dict[str, list[Step]] = field(default_factory=dict)
    # local mode: a client's DP-SGD batch size, steps (or epochs) per round
    batch_size: int = 1
    steps: int = 1
    epochs: int | None = None

    def record_central(self) -> float:
        """Account for one released round of central mode; returns the running epsilon."""
        self.history.append((self.noise_multiplier, self.sample_rate, 1))
        return self.epsilon()

    def record_local(self, client_id: str, num_examples: int) -> None:
        """Account for one round of DP-SGD on client `client_id` of `num_examples` examples:
        Poisson rate `local_sample_rate`, `local_steps` steps (as `fedlora.clients.train`
        runs them)."""
        n = max(1, int(num_examples))
        step = (
            self.noise_multiplier,
            local_sample_rate(n, self.batch_size),
            local_steps(n, self.batch_size, self.steps, self.epochs),
        )
        self.clients.setdefault(client_id, []).append(step)

    def client_epsilons(self) -> dict[str, float]:
        return {c: epsilon(h, self.delta, self.accountant) for c, h in self.clients.items()}

    def epsilon(self) -> float:
        """Central: the population's epsilon; local: the largest client epsilon."""
        if self.mode == "central":
            return epsilon(self.history, self.delta, self.accountant)
        return max(self.client_epsilons().values(), default=0.0)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "accountant": self.accountant,
        }
        if self.mode == "central":
            out["client_sampling_rate"] = self.sample_rate
            out["rounds_accounted"] = sum(n for _, _, n in self.history)
        else:
            eps = sorted(self.client_epsilons().values())
            out["client_epsilons"] = {
                "clients": len(eps),
                "min": eps[0] if eps else 0.0,
                "median": eps[len(eps) // 2] if eps else 0.0,
                "max": eps[-1] if eps else 0.0,
            }
        return out

    def central_dp(self, clients_per_round: int, seed: int) -> CentralDP:
        """The server-side mechanism of central mode."""
        return CentralDP(self.clip_norm, self.noise_multiplier, clients_per_round, seed)

    def local_dp(self) -> LocalDP:
        """The clients' DP-SGD options of local mode."""
        return LocalDP(self.clip_norm, self.noise_multiplier)

    def state_dict(self) -> dict[str, Any]:
        """The histories and the noise multiplier (kept on resume, even if rounds grow)."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "history": [list(h) for h in self.history],
            "clients": {k: [list(h) for h in v] for k, v in self.clients.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.noise_multiplier = float(state.get("noise_multiplier", self.noise_multiplier))
        self.history = [_step(h) for h in state.get("history", [])]
        self.clients = {k: [_step(h) for h in v] for k, v in state.get("clients", {}).items()}


def _step(h: Sequence[Any]) -> Step:
    return (float(h[0]), float(h[1]), int(h[2]))


def plan(
    *,
    mode: str,
    clip_norm: float,
    noise_multiplier: float | None,
    target_epsilon: float | None,
    delta: float | None,
    accountant: str,
    rounds: int,
    clients_per_round: int,
    num_clients: int,
    client_sizes: Sequence[int],
    batch_size: int,
    steps: int,
    epochs: int | None,
) -> PrivacyLedger:
    """The run's resolved privacy: delta (default `default_delta` of the training clients for
    central mode, of the largest client's examples for local mode) and the noise multiplier
    (given, or solved from `target_epsilon` over the whole run: central, `rounds` steps at
    client sampling rate ``clients_per_round / num_clients``; local, the worst case of the
    smallest client taking part in every round)."""
    if mode not in ("central", "local"):
        raise FedLoraError(f"privacy.mode: {mode!r} is not 'central' or 'local'")
    if mode == "central":
        q = min(1.0, clients_per_round / num_clients)
        delta = delta if delta is not None else default_delta(num_clients)
        total_steps = rounds
    else:
        smallest = min(client_sizes)
        q = local_sample_rate(smallest, batch_size)
        delta = delta if delta is not None else default_delta(max(client_sizes))
        total_steps = rounds * local_steps(smallest, batch_size, steps, epochs)
    if noise_multiplier is None:
        if target_epsilon is None:
            raise FedLoraError("privacy: set privacy.noise_multiplier or privacy.target_epsilon")
        noise_multiplier = noise_multiplier_for(target_epsilon, delta, q, total_steps, accountant)
    return PrivacyLedger(
        mode=mode,
        noise_multiplier=float(noise_multiplier),
        clip_norm=float(clip_norm),
        delta=float(delta),
        accountant=accountant,
        sample_rate=q if mode == "central" else 1.0,
        batch_size=int(batch_size),
        steps=int(steps),
        epochs=epochs,
    )


@dataclass(frozen=True)
class LocalDP:
    """DP-SGD options of a client (`fedlora.clients.dp_sgd`): per-example clip norm and noise
    multiplier."""

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise FedLoraError(f"privacy.clip_norm = {self.clip_norm}: must be > 0")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise FedLoraError(f"privacy.noise_multiplier = {self.noise_multiplier}: must be >= 0")


# -- central DP: clipping and noise -----------------------------------------------------------


@dataclass(frozen=True)
class CentralDP:
    """Client-level DP on the server: clip each client's update to `clip_norm`, average with
    the fixed denominator `clients_per_round`, add noise of std
    ``noise_multiplier * clip_norm / clients_per_round`` to the average."""

    clip_norm: float
    noise_multiplier: float
    clients_per_round: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise FedLoraError(f"privacy.clip_norm = {self.clip_norm}: must be > 0")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise FedLoraError(f"privacy.noise_multiplier = {self.noise_multiplier}: must be >= 0")
        if self.clients_per_round < 1:
            raise FedLoraError(f"privacy: clients_per_round = {self.clients_per_round}: >= 1")

    @property
    def weight(self) -> float:
        """Each client's aggregation weight: 1 / K, fixed (not its number of examples, which is
        private and would change the sensitivity)."""
        return 1.0 / self.clients_per_round

    @property
    def noise_std(self) -> float:
        """Std of the noise on each entry of the averaged released quantity."""
        return self.noise_multiplier * self.clip_norm / self.clients_per_round

    def noise(self, shape: Sequence[int], server_round: int, name: str) -> Tensor:
        """Seeded N(0, noise_std^2) of `shape` (float64) for tensor `name` of `server_round`."""
        g = torch.Generator().manual_seed(
            module_seed(self.seed, f"dp-noise/{name}", server_round) % (2**63)
        )
        return torch.randn(tuple(shape), generator=g, dtype=F64) * self.noise_std


def fresh_start(
    ranks: Mapping[str, int],
    scales: Mapping[str, float],
    shapes: Mapping[str, tuple[int, int]],
    seed: int,
) -> Adapter:
    """The factors a client initialises when its payload has no adapter (`init_lora`)."""
    return {m: init_lora(seed, m, r, shapes[m], scales[m], F64) for m, r in ranks.items()}


def _start_for(f: LoraFactors, start: LoraFactors | None, module: str, who: str) -> LoraFactors:
    """`start` cut to `f`'s rank (HetLoRA clients may prune their trailing slots)."""
    if start is None:
        raise FedLoraError(f"{who}, module {module}: no record of the factors it was sent")
    if start.rank < f.rank:
        raise FedLoraError(
            f"{who}, module {module}: rank {f.rank} exceeds the rank {start.rank} it was sent"
        )
    if start.rank == f.rank:
        return start
    return LoraFactors(start.A[: f.rank], start.B[:, : f.rank], start.scale)


def factor_update_norm(
    sent: Mapping[str, LoraFactors],
    start: Mapping[str, LoraFactors],
    parts: str = "AB",
    who: str = "client",
) -> float:
    """``sqrt(sum_m ||A - A0||^2 + ||s B - s0 B0||^2)`` over the `parts` ("A", "B") of every
    module: the L2 norm of the client's factor update (B carries its scale)."""
    total = 0.0
    for m, f in sent.items():
        s = _start_for(f, start.get(m), m, who)
        if "A" in parts:
            total += float(((f.A.to(F64) - s.A.to(F64)) ** 2).sum())
        if "B" in parts:
            total += float(((f.scaled_B() - s.scaled_B()) ** 2).sum())
    return math.sqrt(total)


def clip_factor_update(
    update: ClientUpdate,
    start: Mapping[str, LoraFactors],
    clip_norm: float,
    parts: str = "AB",
) -> tuple[ClientUpdate, float]:
    """The update with its factor change clipped to `clip_norm`: ``start + c (sent - start)``
    on the `parts` it trains (the others are its start's). Returns (update, norm before).
    Shapes and scales are unchanged, so the strategy aggregates it as it would the original."""
    who = f"client {update.client_id}"
    norm = factor_update_norm(update.adapter, start, parts, who)
    c = clip_factor(norm, clip_norm)
    if c == 1.0:
        return update, norm
    out: Adapter = {}
    for m, f in update.adapter.items():
        s = _start_for(f, start.get(m), m, who)
        A = s.A.to(F64) + c * (f.A.to(F64) - s.A.to(F64)) if "A" in parts else f.A.to(F64)
        G = s.scaled_B() + c * (f.scaled_B() - s.scaled_B()) if "B" in parts else f.scaled_B()
        out[m] = LoraFactors(A.to(f.A.dtype), (G / f.scale).to(f.B.dtype), f.scale)
    extras = dict(update.extras, dp_clip_factor=c)
    return ClientUpdate(update.client_id, out, update.num_examples, extras), norm


def delta_update_terms(
    update: ClientUpdate, start: Mapping[str, LoraFactors], clip_norm: float
) -> tuple[dict[str, list[tuple[Tensor, Tensor, float]]], float]:
    """Per module, the terms ``(G, A, w)`` of ``start + c (delta - start)`` (effective deltas
    ``G @ A``, G = scale * B), with c clipping the update's global delta norm
    ``||delta - start||`` (from r x r Grams, `fedlora.core.norms.adapter_norm`). Returns (terms,
    norm before clipping)."""
    who = f"client {update.client_id}"
    starts = {m: start.get(m) for m in update.adapter}
    for m, s in starts.items():
        if s is None:
            raise FedLoraError(f"{who}, module {m}: no record of the factors it was sent")
    norm = adapter_norm(update.adapter, {m: s for m, s in starts.items() if s is not None})
    c = clip_factor(norm, clip_norm)
    terms: dict[str, list[tuple[Tensor, Tensor, float]]] = {}
    for m, f in update.adapter.items():
        s = starts[m]
        assert s is not None
        parts = [(f.scaled_B(), f.A.to(F64), c)]
        if c < 1.0 and s.rank and bool(s.B.any()):
            parts.append((s.scaled_B(), s.A.to(F64), 1.0 - c))
        terms[m] = parts
    return terms, norm


# -- central DP inside a strategy --------------------------------------------------------------


def attach_central(strategy: Any, dp: CentralDP) -> Any:
    """Turn central DP on for `strategy` (a `fedlora.Strategy`); a strategy whose released
    quantity has no bounded sensitivity refuses by name."""
    if not strategy.dp_released:
        raise FedLoraError(
            f"privacy.mode = 'central': strategy {strategy.name} refuses it: {strategy.dp_refusal}"
        )
    reason = getattr(strategy, "dp_problem", lambda: None)()
    if reason:
        raise FedLoraError(f"privacy.mode = 'central': strategy {strategy.name}: {reason}")
    strategy.privacy = dp
    return strategy


def _take_starts(strategy: Any, updates: Sequence[ClientUpdate]) -> tuple[dict, list]:
    """(starts of the updates' clients, starts of configured clients that sent nothing)."""
    starts = strategy.dp_starts
    got = {u.client_id for u in updates}
    missing = [(cid, s) for cid, s in sorted(starts.items()) if cid not in got]
    strategy.dp_starts = {}
    return starts, missing


def private_factor_updates(
    strategy: Any, updates: list[ClientUpdate], parts: str = "AB"
) -> list[ClientUpdate]:
    """Under central DP (``strategy.privacy`` set): every update clipped relative to its
    start (`clip_factor_update`), plus an unchanged start for each configured client that sent
    nothing (a zero update: with the fixed denominator a missing client moves nothing).
    Without central DP, `updates` unchanged."""
    dp = strategy.privacy
    if dp is None:
        return updates
    starts, missing = _take_starts(strategy, updates)
    out = []
    for u in updates:
        if u.client_id not in starts:
            raise FedLoraError(
                f"{strategy.name}: client {u.client_id} sent an update but was not configured "
                "this round"
            )
        out.append(clip_factor_update(u, starts[u.client_id], dp.clip_norm, parts)[0])
    out += [ClientUpdate(cid, dict(s), 1, {"dp_missing": 1.0}) for cid, s in missing]
    return out


def add_noise_(
    tensors: dict[str, Tensor], dp: CentralDP | None, server_round: int, tag: str
) -> None:
    """Add the round's seeded noise to each aggregated tensor in place (no-op without DP)."""
    if dp is None or dp.noise_multiplier == 0:
        return
    for m in sorted(tensors):
        t = tensors[m]
        tensors[m] = t + dp.noise(t.shape, server_round, f"{tag}/{m}").to(t.dtype)
