"""Privacy accounting: epsilon of a run's history of subsampled Gaussian mechanisms, the noise
multiplier for a target epsilon, and the run's ledger (`PrivacyLedger`, resolved by `plan`).

Two neighbouring relations, one per way clients are sampled (``privacy.sampling``):

* ``"poisson"``: each client takes part independently with probability q; neighbouring
  datasets add or remove one client (``"add_remove"``), the sum of clipped contributions moves
  by at most C. Accounted by Opacus's RDP (Mironov et al. 2019) or PRV (Gopi et al. 2021)
  accountant for the Poisson-subsampled Gaussian.
* ``"fixed"``: exactly K of N clients, drawn without replacement; the number of clients is
  public and neighbours replace one client (``"replace_one"``), which moves the sum by up to
  2C: the mechanism's noise multiplier against that sensitivity is ``sigma / 2``. Accounted by
  dp_accounting's RDP accountant for sampling without replacement (Wang, Balle and
  Kasiviswanathan 2019, Theorem 27).

Local mode (DP-SGD on each client) is Poisson-sampled examples inside a client, add/remove.
This module imports torch's siblings only; Opacus and dp_accounting load when an epsilon is
asked for.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from fedlora.core.contract import FedLoraError, module_seed

MODES = ("none", "central", "local")
ACCOUNTANTS = ("rdp", "prv")
SAMPLINGS = {"poisson": "add_remove", "fixed": "replace_one"}
#: the most (sigma, q) steps PRV composes: Opacus's PRV accountant recomputes the whole
#: composition on every call, seconds at a thousand rounds (use "rdp" beyond)
PRV_MAX_STEPS = 2_000

# (noise_multiplier, sample_rate, steps): one entry of a subsampled Gaussian mechanism history
Step = tuple[float, float, int]


def draw_secret() -> int:
    """128 bits from the operating system: the seed of noise and sampling nobody else knows."""
    return secrets.randbits(128)


def seeded_secret(seed: int, party: str) -> int:
    """The secret of `party` derived from a public seed: reproducible and NOT private (only
    behind ``privacy.insecure_seeded_noise = true``)."""
    return module_seed(seed, f"insecure-seeded/{party}")


def _opacus(name: str):
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError:  # pragma: no cover - opacus is in the `privacy` extra (and `all`)
        raise FedLoraError(
            "privacy: the accountant needs opacus; pip install 'fedlora[privacy]'"
        ) from None
    if name not in ACCOUNTANTS:
        raise FedLoraError(f"privacy.accountant: {name!r} is not one of {', '.join(ACCOUNTANTS)}")
    return RDPAccountant() if name == "rdp" else PRVAccountant()


def epsilon(
    history: Sequence[Step], delta: float, accountant: str = "rdp", relation: str = "add_remove"
) -> float:
    """Epsilon of the composition of the subsampled Gaussian mechanisms in `history` at
    `delta` under `relation` (see the module doc); 0 for an empty history, never negative."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0 and q > 0]
    if not history:
        return 0.0
    if any(not (s > 0 and math.isfinite(s)) for s, _, _ in history):
        raise FedLoraError("privacy: a noise multiplier must be > 0 to account for it")
    if relation == "replace_one":
        return max(0.0, _epsilon_replace_one(_merged(history), delta))
    if relation != "add_remove":
        raise FedLoraError(f"privacy: unknown neighbouring relation {relation!r}")
    if accountant == "prv" and sum(n for _, _, n in history) > PRV_MAX_STEPS:
        raise FedLoraError(
            f"privacy.accountant = 'prv': more than {PRV_MAX_STEPS} steps to compose (PRV "
            "recomputes them all every round); use privacy.accountant = 'rdp'"
        )
    acc = _opacus(accountant)
    acc.history = _merged(history)
    import warnings

    with warnings.catch_warnings():  # PRV's log(0) at q = 1 is handled inside it; RDP's
        warnings.simplefilter("ignore", RuntimeWarning)  # largest-alpha notice is a valid bound
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return max(0.0, float(acc.get_epsilon(delta)))


def _epsilon_replace_one(history: Sequence[Step], delta: float) -> float:
    """dp_accounting's RDP epsilon of Gaussian mechanisms on fixed-size samples drawn without
    replacement, replace-one neighbours (sensitivity 2C: noise multiplier sigma / 2)."""
    try:
        import dp_accounting
    except ImportError:  # pragma: no cover - dp-accounting is in the `privacy` extra
        raise FedLoraError(
            "privacy.sampling = 'fixed' needs dp-accounting; pip install 'fedlora[privacy]'"
        ) from None
    rel = dp_accounting.NeighboringRelation.REPLACE_ONE
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=rel)
    for s, q, n in history:
        frac = Fraction(q).limit_denominator(10**9)  # q = K / N of integers
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            frac.denominator, frac.numerator, dp_accounting.GaussianDpEvent(s / 2.0)
        )
        acc.compose(event, n)
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
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    relation: str = "add_remove",
) -> float:
    """The smallest noise multiplier whose `steps`-fold subsampled Gaussian mechanism at rate
    `sample_rate` stays within (`target_epsilon`, `delta`) (to 1% of epsilon, from below)."""
    q = min(1.0, sample_rate)

    def eps(sigma: float) -> float:
        return epsilon([(sigma, q, int(steps))], delta, accountant, relation)

    lo, hi = 0.0, 1.0  # eps(lo) > target >= eps(hi): epsilon falls as sigma grows
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2.0 * hi
        if hi > 1e6:
            raise FedLoraError(
                f"privacy.target_epsilon = {target_epsilon}: out of reach (noise multiplier "
                "over 1e6); raise it or lower rounds"
            )
    for _ in range(60):
        if eps(hi) >= 0.99 * target_epsilon or hi - lo <= 1e-6 * hi:
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


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
    """The run's privacy accounting and the server's secret, the same in every engine.

    Central mode: one history for the whole population (each round: noise multiplier,
    client sampling rate, 1 step) under `relation`. Local mode: a history per client, extended
    each round it is sent a payload by the DP-SGD steps its size implies (`record_local`: the
    server's own count, never what the client reports). ``secret`` seeds the server's noise
    and client sampling (`draw_secret`; never sent, kept in the checkpoint); ``clip`` is the
    adaptive clip norm of central mode (None: fixed ``clip_norm``). `state_dict` /
    `load_state_dict` make a resumed run account and draw exactly as an uninterrupted one.
    """

    mode: str
    noise_multiplier: float
    clip_norm: float
    delta: float
    accountant: str = "rdp"
    sample_rate: float = 1.0  # central: clients_per_round / num_clients
    relation: str = "add_remove"
    history: list[Step] = field(default_factory=list)
    clients: dict[str, list[Step]] = field(default_factory=dict)
    # local mode: a client's DP-SGD batch size, steps (or epochs) per round
    batch_size: int = 1
    steps: int = 1
    epochs: int | None = None
    secret: int = 0
    seeded: bool = False  # the secret comes from the public seed: NOT private
    clip: float | None = None

    def record_central(self, sample_rate: float | None = None) -> float:
        """Account for one released round of central mode (at `sample_rate`, default the
        planned one); returns the running epsilon."""
        q = self.sample_rate if sample_rate is None else float(sample_rate)
        self.history.append((self.noise_multiplier, q, 1))
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
            return epsilon(self.history, self.delta, self.accountant, self.relation)
        return max(self.client_epsilons().values(), default=0.0)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "accountant": self.accountant,
            "neighbouring_relation": self.relation,
            "private": not self.seeded,
        }
        if self.seeded:
            out["warning"] = (
                "privacy.insecure_seeded_noise = true: noise and sampling come from the public "
                "seed, so anyone with the configuration can remove the noise: NOT private"
            )
        if self.mode == "central":
            out["client_sampling_rate"] = self.sample_rate
            out["rounds_accounted"] = sum(n for _, _, n in self.history)
            if self.clip is not None:
                out["adaptive_clip_norm"] = self.clip
        else:
            eps = sorted(self.client_epsilons().values())
            out["client_epsilons"] = {
                "clients": len(eps),
                "min": eps[0] if eps else 0.0,
                "median": eps[len(eps) // 2] if eps else 0.0,
                "max": eps[-1] if eps else 0.0,
            }
        return out

    def state_dict(self) -> dict[str, Any]:
        """The histories, the noise multiplier, the secret and the adaptive clip norm (kept on
        resume, even if rounds grow)."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "history": [list(h) for h in self.history],
            "clients": {k: [list(h) for h in v] for k, v in self.clients.items()},
            "secret": format(self.secret, "x"),
            "clip": self.clip,
        }

    def public_state(self) -> dict[str, Any]:
        """`state_dict` without the secret: what may go into a shared file (the secret stays
        in the checkpoint, which is as secret as the noise it removes)."""
        return {k: v for k, v in self.state_dict().items() if k != "secret"}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.noise_multiplier = float(state.get("noise_multiplier", self.noise_multiplier))
        self.history = [_step(h) for h in state.get("history", [])]
        self.clients = {k: [_step(h) for h in v] for k, v in state.get("clients", {}).items()}
        if "secret" in state:
            self.secret = int(str(state["secret"]), 16)
        if state.get("clip") is not None:
            self.clip = float(state["clip"])


def _step(h: Sequence[Any]) -> Step:
    return (float(h[0]), float(h[1]), int(h[2]))


@dataclass(frozen=True)
class Plan:
    """What `plan` needs of an experiment: the privacy section and the run's sizes."""

    mode: str
    clip_norm: float
    noise_multiplier: float | None
    target_epsilon: float | None
    delta: float | None
    accountant: str
    rounds: int
    clients_per_round: int
    num_clients: int
    client_sizes: Sequence[int]
    batch_size: int
    steps: int
    epochs: int | None
    sampling: str = "poisson"
    seed: int = 0
    insecure_seeded_noise: bool = False


def plan(p: Plan) -> PrivacyLedger:
    """The run's resolved privacy: delta (default `default_delta` of the training clients for
    central mode, of the largest client's examples for local mode; at least that population's
    1/n is refused), the noise multiplier (given, or solved from `target_epsilon` over the
    whole run: central, `rounds` steps at client sampling rate ``clients_per_round /
    num_clients``; local, the worst case of the smallest client taking part in every round)
    and the server's secret."""
    if p.mode not in ("central", "local"):
        raise FedLoraError(f"privacy.mode: {p.mode!r} is not 'central' or 'local'")
    if p.sampling not in SAMPLINGS:
        raise FedLoraError(f"privacy.sampling: {p.sampling!r} is not one of {sorted(SAMPLINGS)}")
    if p.mode == "central":
        population, total = p.num_clients, p.rounds
        q = min(1.0, p.clients_per_round / p.num_clients)
        relation, what = SAMPLINGS[p.sampling], "training clients"
    else:
        smallest = min(p.client_sizes)
        population, relation, what = max(p.client_sizes), "add_remove", "examples of a client"
        q = local_sample_rate(smallest, p.batch_size)
        total = p.rounds * local_steps(smallest, p.batch_size, p.steps, p.epochs)
    delta = p.delta if p.delta is not None else default_delta(population)
    if not 0 < delta < 1.0 / population:
        raise FedLoraError(
            f"privacy.delta = {delta}: must be below 1/n = {1.0 / population:.3g} for n = "
            f"{population} {what} (a larger delta allows releasing one of them outright)"
        )
    sigma = p.noise_multiplier
    if sigma is None:
        if p.target_epsilon is None:
            raise FedLoraError("privacy: set privacy.noise_multiplier or privacy.target_epsilon")
        sigma = noise_multiplier_for(p.target_epsilon, delta, q, total, p.accountant, relation)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise FedLoraError(f"privacy.noise_multiplier = {sigma}: must be > 0 in a DP mode")
    epsilon([(sigma, q, total)], delta, p.accountant, relation)  # refuses what it cannot account
    secret = seeded_secret(p.seed, "server") if p.insecure_seeded_noise else draw_secret()
    return PrivacyLedger(
        mode=p.mode,
        noise_multiplier=float(sigma),
        clip_norm=float(p.clip_norm),
        delta=float(delta),
        accountant=p.accountant,
        sample_rate=q if p.mode == "central" else 1.0,
        relation=relation,
        batch_size=int(p.batch_size),
        steps=int(p.steps),
        epochs=p.epochs,
        secret=secret,
        seeded=p.insecure_seeded_noise,
    )
