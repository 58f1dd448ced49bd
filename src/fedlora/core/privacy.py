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
  - ``"trained"`` (lora_a2): the uploaded slots of the factor trained this round (of both
    factors, clipped together, with ``alternating_freeze = false``);
  - ``"delta"`` (flexlora, flora): the effective delta ``scale * B @ A``, whose norm is bounded
    from above by `delta_change_norm` (QR of the stacked factors plus the rounding: no upload
    can cancel or overflow it), never from the dense matrix. Noise on a delta is dense.

* ``"local"`` (sample-level DP-SGD on each client, `fedlora.clients.dp_sgd`): per-example gradient
  clipping and noise on the client's trainable LoRA factors; each client's epsilon
  accumulates over the rounds it takes part in.

Noise and client sampling come from a secret the party that adds the noise draws from the OS
(`fedlora.core.accounting.draw_secret`): the server's is never sent and is kept in its
checkpoint only (a resumed run draws exactly what an uninterrupted one would); a client's is
drawn by the client and never leaves it. Every draw is a SHAKE-256 stream keyed by the whole
secret (`secret_uniform`, `secret_normal`): no 32- or 64-bit generator seed to search.
Seeded, reproducible noise (from the public ``seed``) exists only behind
``privacy.insecure_seeded_noise = true``, and such a run says it is not private.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedlora.core.contract import Adapter, ClientUpdate, FedLoraError, LoraFactors
from fedlora.core.norms import clip_factor

F64 = torch.float64


#: domain separation of every keyed stream (a new version: a new stream, never an old one)
_STREAM = b"fedlora-dp-stream/v2"
#: 64-bit words drawn per SHAKE call (bounds the memory of one call, 32 MiB)
_CHUNK = 1 << 22


def _words(secret: int, count: int, names: Sequence[Any]) -> np.ndarray:
    """`count` uniform 64-bit words from SHAKE-256 keyed by the WHOLE `secret` (every bit of
    it, whatever its width: no 32- or 64-bit seed in between) and `names`. SHAKE-256 is an
    extendable-output function of SHA-3: without the key its output cannot be told from
    random, so finding the stream means guessing the secret (2^128 for `draw_secret`)."""
    if secret < 0:
        raise FedLoraError("privacy: a secret must be a non-negative integer")
    key = secret.to_bytes(max(16, (secret.bit_length() + 7) // 8), "little")
    label = "/".join(str(n) for n in names).encode()
    prefix = b"%s|%d|%s|%d|%s" % (_STREAM, len(key), key, len(label), label)
    out = np.empty(count, dtype=np.uint64)
    for i, lo in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - lo)
        raw = hashlib.shake_256(prefix + b"|%d" % i).digest(8 * n)
        out[lo : lo + n] = np.frombuffer(raw, dtype="<u8")
    return out


def secret_uniform(secret: int, count: int, *names: Any) -> np.ndarray:
    """`count` uniforms in (0, 1) (53-bit, float64) keyed by `secret` and `names` (`_words`)."""
    w = _words(secret, int(count), names)
    return ((w >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def secret_normal(secret: int, shape: Sequence[int], *names: Any) -> Tensor:
    """Standard normal noise of `shape` (float64) keyed by `secret` and `names`: Box-Muller on
    `secret_uniform` (both uniforms in (0, 1), so the log is finite and |z| < 8.6)."""
    n = math.prod(int(d) for d in shape)
    half = (n + 1) // 2
    u = secret_uniform(secret, 2 * half, *names)
    r = np.sqrt(-2.0 * np.log(u[:half]))
    z = np.concatenate([r * np.cos(2 * math.pi * u[half:]), r * np.sin(2 * math.pi * u[half:])])
    return torch.from_numpy(z[:n].copy()).reshape(tuple(int(d) for d in shape))


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


def local_dp_refusal(privacy: LocalDP, extras: Mapping[str, Any]) -> str | None:
    """Why a local-DP client refuses a payload with `extras` (None: it does not): a payload
    setting that would weaken its DP-SGD is the server's to ask for, never to impose.
    ``masked_training``: LoRA-A2 would pick the slots it trains from one unclipped,
    un-noised gradient step, which reveals an example (accuracy 1.00 at sigma 1e6)."""
    if extras.get("masked_training"):
        return (
            "refuses masked_training under local DP: its slots would come from an unclipped, "
            "un-noised gradient"
        )
    return None


class PrivacyRefusal(FedLoraError):
    """A client refusing a setting that would weaken its own DP (one line, the reason)."""


#: a Flower node's own DP-SGD settings (node config), which the run config cannot weaken
NODE_DP_KEYS = ("dp-clip-norm", "dp-noise-multiplier", "dp-allow-seeded-noise")


def node_local_dp(run: LocalDP | None, node_config: Mapping[str, Any]) -> LocalDP | None:
    """The DP-SGD a Flower node trains with: the run config's (`run`), unless the node's own
    configuration (`NODE_DP_KEYS`) says otherwise, in which case the node refuses with a
    one-line `FedLoraError`: a run without local DP on a node that declares it, a clip norm
    or noise multiplier other than its own, or seeded (replayable) noise it did not allow."""
    own = {k: node_config[k] for k in NODE_DP_KEYS[:2] if k in node_config}
    allow_seeded = str(node_config.get("dp-allow-seeded-noise", "false")).lower() == "true"
    if run is None:
        if own:
            raise PrivacyRefusal(
                f"node config {sorted(own)[0]} asks for local DP, but the run config's "
                "privacy.mode is not 'local': refused"
            )
        return None
    if run.seeded and not allow_seeded:
        raise PrivacyRefusal(
            "run config privacy.insecure_seeded_noise = true would make this node's uploads "
            "replayable: refused (node config dp-allow-seeded-noise = true allows it)"
        )
    for key, mine, theirs in (
        ("dp-clip-norm", own.get("dp-clip-norm"), run.clip_norm),
        ("dp-noise-multiplier", own.get("dp-noise-multiplier"), run.noise_multiplier),
    ):
        if mine is None:
            continue
        value = _number(mine, key)
        if not math.isclose(value, theirs, rel_tol=1e-9):
            raise PrivacyRefusal(
                f"node config {key} = {value:g}, the run config's is {theirs:g}: refused"
            )
    return run


def _number(value: Any, key: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise FedLoraError(f"node config {key} = {value!r}: not a number") from None
    if not (out > 0 and math.isfinite(out)):
        raise FedLoraError(f"node config {key} = {value!r}: must be a finite number > 0")
    return out


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
        return secret_normal(self.secret, shape, "dp-noise", server_round, name) * self.noise_std

    def clip(self, norm: float) -> float:
        """The factor that clips an update of `norm` to `clip_norm` (and records the norm for
        the adaptive clip). A norm that is not a finite number >= 0 is refused: the old
        ``min(1, C / nan)`` was 1, an unclipped update."""
        if not (norm >= 0 and math.isfinite(norm)):
            raise FedLoraError(f"privacy: an update norm of {norm} cannot be clipped")
        self.norms.append(float(norm))
        return clip_factor(norm, self.clip_norm)

    def check_upload(self, strategy: Any, server_round: int, update: ClientUpdate) -> None:
        """`check_private_update` (`Strategy.check_update` calls it under central DP)."""
        check_private_update(strategy, server_round, update)

    def noised_count(self, server_round: int) -> float:
        """Andrew et al. 2021 (Algorithm 1): the CENTERED count ``sum_k (1[norm_k <= C] - 1/2)``
        of this round's clipped updates plus N(0, count_noise^2) from the secret. Centering
        makes adding or removing one client move it by 1/2 (not 1), which is what the split
        ``(z^-2 - (2 count_noise)^-2)^-1/2`` of `AdaptiveClip.update_multiplier` assumes."""
        assert self.adaptive is not None
        centered = sum((n <= self.clip_norm) - 0.5 for n in self.norms)
        noise = float(secret_normal(self.secret, (1,), "dp-count", server_round)[0])
        return centered + noise * self.adaptive.count_noise

    def end_round(self, server_round: int) -> None:
        """After a release: move an adaptive clip norm toward its quantile, with the estimate
        ``b = noised_count / K + 1/2`` of the fraction at or under C, forget the round's
        norms."""
        if self.adaptive is not None:
            a = self.adaptive
            b = self.noised_count(server_round) / self.clients_per_round + 0.5
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


#: relative rounding of the orthogonalised norm, per (d_in + R) R: a generous multiple of the
#: backward error of Householder QR and one matrix product in float64 (Higham, ch. 19)
_ROUNDING = 8 * 2.0**-52


def delta_change_norm(terms: Sequence[tuple[Tensor, Tensor]], who: str = "client") -> float:
    """An upper bound of ``||sum_i G_i @ H_i||_F`` (float64) that no choice of factors can
    cancel or overflow: the norm of ``G @ R^T`` with ``H^T = Q R`` (Householder QR; Q has
    orthonormal columns, so this is the norm of the product itself, never a difference of
    r x r Gram sums as in `fedlora.core.norms.lowrank_sq_norm`, which A rows [1e12, 0],
    [1e12, w] with B columns g, -g reduce to 0), plus the worst rounding of that computation,
    ``_ROUNDING (d_in + R) R ||G||_F ||H||_F``. A second, independent bound, the triangle
    inequality ``sum_i ||G_i||_F ||H_i||_F``, must not be exceeded by more than the rounding
    (else the computation is wrong and nothing is released)."""
    terms = [(g.to(F64), h.to(F64)) for g, h in terms if g.shape[1] > 0]
    if not terms:
        return 0.0
    G = torch.cat([g for g, _ in terms], dim=1)
    H = torch.cat([h for _, h in terms], dim=0)
    _, R = torch.linalg.qr(H.T, mode="reduced")
    norm = float(torch.linalg.matrix_norm(G @ R.T))
    rank, d_in = H.shape
    rounding = _ROUNDING * (d_in + rank) * rank * float(G.norm() * H.norm())
    triangle = sum(float(g.norm() * h.norm()) for g, h in terms)
    if not (math.isfinite(norm + rounding) and norm <= triangle + rounding):
        raise FedLoraError(
            f"{who}: contribution norm {norm:.6g} disagrees with its bound {triangle:.6g}"
        )
    return norm + rounding


def check_private_update(strategy: Any, server_round: int, update: ClientUpdate) -> None:
    """What central DP needs of an upload before any arithmetic on it: every module one the
    release covers (`CentralDP.ranks`), finite factors and a LoRA scale that is a finite
    number in (0, the largest configured scale of the module] (`CentralDP.scales`). With
    float32 factors (`check_update_factors`) every float64 quantity of the clip and the
    release is then finite by construction (entries below 3.4e38, products below 1e80)."""
    dp: CentralDP = strategy.privacy
    who = f"{strategy.name}: round {server_round}, client {update.client_id}"
    for m, f in update.adapter.items():
        if m not in dp.ranks:
            raise FedLoraError(f"{who}, module {m}: not a module central DP releases")
        top = dp.scales.get(m, 0.0)
        scale = f.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise FedLoraError(f"{who}, module {m}: scale {scale!r} is not a number")
        if not (0 < scale <= top * (1 + 1e-12)):
            raise FedLoraError(
                f"{who}, module {m}: scale {scale!r} outside (0, {top:g}], the configured range"
            )
        for name, t in (("A", f.A), ("B", f.B)):
            if not bool(torch.isfinite(t).all()):
                raise FedLoraError(f"{who}, module {m}: {name} is not finite")


def delta_update_terms(
    update: ClientUpdate, start: Mapping[str, LoraFactors], clip_norm: float | CentralDP
) -> tuple[dict[str, list[tuple[Tensor, Tensor, float]]], float]:
    """Per module, the terms ``(G, A, w)`` of the clipped change ``c (delta - start)``
    (effective deltas ``G @ A``, G = scale * B), with c clipping the update's global delta
    norm ``||delta - start||``, bounded from above by `delta_change_norm` so that no upload
    slips past the clip. Returns (terms, that norm before clipping)."""
    who = f"client {update.client_id}"
    starts = {m: start.get(m) for m in update.adapter}
    sq = 0.0
    for m, s in starts.items():
        if s is None:
            raise FedLoraError(f"{who}, module {m}: no record of the factors it was sent")
        f = update.adapter[m]
        sq += delta_change_norm([(f.scaled_B(), f.A), (-s.scaled_B(), s.A)], who) ** 2
    norm = math.sqrt(sq)
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
    quantity has no bounded sensitivity, or whose options central DP cannot bound, refuses by
    name: the rules of `Strategy.option_problems`, on the options it holds."""
    problems = strategy.option_problems(strategy.held_options(), "central")
    if problems:
        raise FedLoraError(f"privacy.mode = 'central': {'; '.join(problems)}")
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
    if dp is None:
        return
    for m in sorted(tensors):
        t = tensors[m]
        if dp.noise_multiplier > 0:
            tensors[m] = t = t + dp.noise(t.shape, server_round, f"{tag}/{m}").to(t.dtype)
        check_finite_release(t, f"{tag}/{m}")


def check_finite_release(t: Tensor, name: str) -> None:
    """The release is finite by construction (`check_private_update`); this is the proof's
    tripwire: a non-finite entry stops the round before anything is published."""
    if not bool(torch.isfinite(t).all()):
        raise FedLoraError(f"privacy: released {name} is not finite; nothing was released")
