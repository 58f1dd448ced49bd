"""Differential privacy for federated LoRA: the mechanisms (clipping, secret Gaussian noise,
adaptive clipping); the accounting is `fedlora.core.accounting`.

Two modes (``[privacy] mode``):

* ``"central"`` (client-level DP, DP-FedAvg, McMahan et al., ICLR 2018): the server releases

      new global = previous global + (1/K) sum_k clip_C(sent_k - start_k) + N(0, (sigma C / K)^2)

  in the quantity its strategy releases, where ``start_k`` is what client k was sent (server
  state), K the (expected) number of clients a round and C the clip norm. Nothing unclipped
  depends on who was sampled: the released shape (the global rank, `CentralDP.ranks`) is the
  configuration's largest rank, heterogeneous ranks are padded into it, and a client that was
  sampled but sent nothing moves nothing. Adding or removing one client moves the release by
  at most C / K. Which quantity each strategy releases is ``Strategy.dp_released`` (see
  docs/privacy.md):

  - ``"factors"`` (fedit, zero_pad, hetlora): the factor vector (A, scale * B) of every module,
    padded to the global rank;
  - ``"B"`` (ffa_lora): scale * B only, A is public;
  - ``"trained"`` (lora_a2): the uploaded slots of the factor trained this round;
  - ``"delta"`` (flexlora, flora): the effective delta ``scale * B @ A``, whose norm comes from
    r x r Grams (`fedlora.core.norms`), never from the dense matrix. Noise on a delta is dense.

* ``"local"`` (sample-level DP-SGD on each client, `fedlora.clients.dp_sgd`): per-example gradient
  clipping and noise on the client's trainable LoRA factors; each client's epsilon
  accumulates over the rounds it takes part in.

Noise and client sampling come from a secret the party that adds the noise draws from the OS
(`fedlora.core.accounting.draw_secret`): the server's is never sent and is kept in its
checkpoint (a resumed run draws exactly what an uninterrupted one would); a client's is drawn
by the client and never leaves it. Seeded, reproducible noise (from the public ``seed``) exists
only behind ``privacy.insecure_seeded_noise = true``, and such a run says it is not private.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedlora.core.contract import Adapter, ClientUpdate, FedLoraError, LoraFactors
from fedlora.core.norms import adapter_norm, clip_factor

F64 = torch.float64


def secret_generator(secret: int, *names: Any) -> torch.Generator:
    """A torch generator seeded from `secret` and `names` (a round, a tensor name): without
    the secret its stream cannot be told from any other seed's."""
    text = "/".join(str(n) for n in (format(secret, "x"), *names))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@dataclass(frozen=True)
class LocalDP:
    """DP-SGD options of a client (`fedlora.clients.dp_sgd`): per-example clip norm, noise
    multiplier, and where its noise and batch sampling come from: ``secret`` (the client's
    own; None: drawn from the OS at every call, never sent) or, with ``seeded``, the public
    training seed (``privacy.insecure_seeded_noise``: reproducible, NOT private)."""

    clip_norm: float
    noise_multiplier: float
    secret: int | None = None
    seeded: bool = False

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise FedLoraError(f"privacy.clip_norm = {self.clip_norm}: must be > 0")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise FedLoraError(f"privacy.noise_multiplier = {self.noise_multiplier}: must be >= 0")


# -- central DP: clipping and noise -----------------------------------------------------------


@dataclass(frozen=True)
class AdaptiveClip:
    """Adaptive clipping (Andrew et al., NeurIPS 2021): the clip norm follows the
    `quantile` of the clients' update norms, ``C <- C exp(-lr (b - quantile))`` with b the
    noisy fraction of clients at or under C (noise std `count_noise` / K). The update's noise
    multiplier becomes ``(z^-2 - (2 count_noise)^-2)^-1/2`` so that the pair of releases costs
    what one Gaussian mechanism of multiplier z does (their Theorem 1)."""

    quantile: float = 0.5
    lr: float = 0.2
    count_noise: float = 1.0

    def update_multiplier(self, z: float) -> float:
        if not 2 * self.count_noise > z:
            raise FedLoraError(
                f"privacy.adaptive_count_noise = {self.count_noise}: must exceed half the noise "
                f"multiplier ({z / 2:.3g}) to leave noise for the update"
            )
        return (z**-2 - (2 * self.count_noise) ** -2) ** -0.5


@dataclass
class CentralDP:
    """Client-level DP on the server: clip each client's update to `clip_norm`, add the
    average with the fixed denominator `clients_per_round` to the previous global, add noise
    of std ``noise_multiplier * clip_norm / clients_per_round`` (`noise_std`).

    ``secret``: the server's (`fedlora.core.accounting.PrivacyLedger.secret`). ``ranks``:
    per module, the released (global) rank, the configuration's largest; ``scales``: per
    module, the largest LoRA scale a client can have (B's clip is in its own units).
    ``adaptive``: the clip norm follows a quantile of the update norms (`AdaptiveClip`); the
    norms a round clips are collected in ``norms``."""

    clip_norm: float
    noise_multiplier: float
    clients_per_round: int
    secret: int = 0
    ranks: dict[str, int] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    adaptive: AdaptiveClip | None = None
    norms: list[float] = field(default_factory=list)

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
        z = self.noise_multiplier
        if self.adaptive is not None and z > 0:
            z = self.adaptive.update_multiplier(z)
        return z * self.clip_norm / self.clients_per_round

    def noise(self, shape: Sequence[int], server_round: int, name: str) -> Tensor:
        """N(0, noise_std^2) of `shape` (float64) for tensor `name` of `server_round`, from
        the server's secret."""
        g = secret_generator(self.secret, "dp-noise", server_round, name)
        return torch.randn(tuple(shape), generator=g, dtype=F64) * self.noise_std

    def clip(self, norm: float) -> float:
        """The factor that clips an update of `norm` to `clip_norm` (and records the norm for
        the adaptive clip)."""
        self.norms.append(float(norm))
        return clip_factor(norm, self.clip_norm)

    def end_round(self, server_round: int) -> None:
        """After a release: move an adaptive clip norm toward its quantile (noisy count from
        the secret), forget the round's norms."""
        if self.adaptive is not None:
            a = self.adaptive
            g = secret_generator(self.secret, "dp-count", server_round)
            count = sum(n <= self.clip_norm for n in self.norms)
            noisy = count + float(torch.randn((), generator=g, dtype=F64)) * a.count_noise
            b = noisy / self.clients_per_round
            self.clip_norm = float(self.clip_norm * math.exp(-a.lr * (b - a.quantile)))
        self.norms = []

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
    clip_norm: float | CentralDP,
    parts: str = "AB",
) -> tuple[ClientUpdate, float]:
    """The update with its factor change clipped to `clip_norm`: ``start + c (sent - start)``
    on the `parts` it trains (the others are its start's). Returns (update, norm before).
    Shapes and scales are unchanged, so the strategy aggregates it as it would the original."""
    who = f"client {update.client_id}"
    norm = factor_update_norm(update.adapter, start, parts, who)
    c = clip_norm.clip(norm) if isinstance(clip_norm, CentralDP) else clip_factor(norm, clip_norm)
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
    update: ClientUpdate, start: Mapping[str, LoraFactors], clip_norm: float | CentralDP
) -> tuple[dict[str, list[tuple[Tensor, Tensor, float]]], float]:
    """Per module, the terms ``(G, A, w)`` of the clipped change ``c (delta - start)``
    (effective deltas ``G @ A``, G = scale * B), with c clipping the update's global delta
    norm ``||delta - start||`` (from r x r Grams, `fedlora.core.norms.adapter_norm`). Returns
    (terms, norm before clipping)."""
    who = f"client {update.client_id}"
    starts = {m: start.get(m) for m in update.adapter}
    for m, s in starts.items():
        if s is None:
            raise FedLoraError(f"{who}, module {m}: no record of the factors it was sent")
    norm = adapter_norm(update.adapter, {m: s for m, s in starts.items() if s is not None})
    c = clip_norm.clip(norm) if isinstance(clip_norm, CentralDP) else clip_factor(norm, clip_norm)
    terms: dict[str, list[tuple[Tensor, Tensor, float]]] = {}
    for m, f in update.adapter.items():
        s = starts[m]
        assert s is not None
        parts = [(f.scaled_B(), f.A.to(F64), c)]
        if s.rank and bool(s.B.any()):
            parts.append((s.scaled_B(), s.A.to(F64), -c))
        terms[m] = parts
    return terms, norm


# -- central DP inside a strategy --------------------------------------------------------------


def release_shape(
    strategy: Any, specs: Sequence[Any]
) -> tuple[dict[str, int], dict[str, float]]:
    """Per module, the rank central DP releases (the largest any of `specs` is configured
    with: fixed by the configuration, never by who is sampled) and the largest LoRA scale a
    client trains it at (`Strategy.dp_scale`)."""
    ranks = {m: max(s.ranks.get(m, 0) for s in specs) for m in strategy.shapes}
    scales = {
        m: max(strategy.dp_scale(s, m) for s in specs if m in s.ranks) for m in ranks if ranks[m]
    }
    return {m: r for m, r in ranks.items() if r > 0}, scales


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


def pop_start(strategy: Any, client_id: str) -> Adapter:
    """The start recorded for `client_id` this round (`Strategy.expect`), removed."""
    start = strategy.dp_starts.pop(client_id, None)
    if start is None:
        raise FedLoraError(
            f"{strategy.name}: client {client_id} sent an update but was not configured this "
            "round"
        )
    return start


def take_starts(strategy: Any, who: Sequence[str]) -> dict[str, Adapter]:
    """The starts `strategy` recorded for this round's configured clients (`Strategy.expect`),
    checked to cover the clients `who` that sent updates; the record is cleared."""
    starts, strategy.dp_starts = strategy.dp_starts, {}
    for cid in who:
        if cid not in starts:
            raise FedLoraError(
                f"{strategy.name}: client {cid} sent an update but was not configured this round"
            )
    return starts


def private_factor_release(
    strategy: Any, server_round: int, updates: Sequence[ClientUpdate], parts: str = "AB"
) -> None:
    """Central DP for a strategy that holds global factors ``strategy.A`` (r, d_in) and
    ``strategy.G`` (d_out, r; scale * B): at the global rank ``dp.ranks[m]`` of every module,
    ``global + (1/K) sum_k c_k pad(sent_k - start_k) + noise`` on the `parts` it releases
    (the others stay). A first round starts from the fresh factors every client starts from
    (`init_lora_A` of the shared seed, B = 0). The clip factor c_k bounds the client's change
    over all modules and parts by ``dp.clip_norm``."""
    from fedlora.core.contract import init_lora_A

    dp: CentralDP = strategy.privacy
    starts = take_starts(strategy, [u.client_id for u in updates])
    A, G = {}, {}
    for m, R in dp.ranks.items():
        d_out, d_in = strategy.shapes[m]
        a = strategy.A.get(m, torch.zeros(0, d_in, dtype=F64)).to(F64)[:R]
        g = strategy.G.get(m, torch.zeros(d_out, 0, dtype=F64)).to(F64)[:, :R]
        extra = init_lora_A(strategy.seed, m, R - a.shape[0], d_in, a.shape[0], F64)
        A[m] = torch.cat([a, extra])
        G[m] = torch.cat([g, torch.zeros(d_out, R - g.shape[1], dtype=F64)], 1)
    for u in updates:
        who = f"client {u.client_id}"
        c = dp.clip(factor_update_norm(u.adapter, starts[u.client_id], parts, who))
        for m, f in u.adapter.items():
            s, r = _start_for(f, starts[u.client_id].get(m), m, who), f.rank
            if "A" in parts:
                A[m][:r] += dp.weight * c * (f.A.to(F64) - s.A.to(F64))
            if "B" in parts:
                G[m][:, :r] += dp.weight * c * (f.scaled_B() - s.scaled_B())
    if "A" in parts:
        add_noise_(A, dp, server_round, "A")
    add_noise_(G, dp, server_round, "G")
    strategy.A, strategy.G = A, G


def add_noise_(
    tensors: dict[str, Tensor], dp: CentralDP | None, server_round: int, tag: str
) -> None:
    """Add the round's seeded noise to each aggregated tensor in place (no-op without DP)."""
    if dp is None or dp.noise_multiplier == 0:
        return
    for m in sorted(tensors):
        t = tensors[m]
        tensors[m] = t + dp.noise(t.shape, server_round, f"{tag}/{m}").to(t.dtype)
