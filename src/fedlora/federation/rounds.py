"""One round of federated training, as steps both engines call.

An engine samples (`sample`), configures each chosen client (`configure`), reaches the
clients its own way (in process, or through Flower messages), and hands their answers to
`close_round` as `Reply` objects, lazily if it likes (the in-process engine trains each client
when the aggregation asks for its update). `close_round` then, for every reply:

1. `accept`: count its bytes, account its privacy cost (local DP: every client that was sent
   a payload, with the steps the server asked for), check it against its payload
   (`fedlora.core.contract.check_update`); a failure is a drop with its reason; its weight
   (``num_examples``) becomes the server's bound of it (`fedlora.core.robust.WeightBound`:
   at most the count registered for the client, else ``robust.max_weight_ratio`` x the
   median count), the reported count recorded in the row's ``capped_weights``;
2. `screen`: the norm bounds (`fedlora.core.robust.screen_updates`; a client without
   round-mates gets the lone bound, from earlier rounds' norms with a growth cap,
   `fedlora.core.robust.NormHistory.lone_limit`);
3. `aggregate`: fold the kept updates into the strategy (none: the global model is unchanged);
4. `round_row`: the round's metrics row, with the epsilon spent so far.

One policy each, the same in every engine (docs/INTERFACES.md):

* a client that fails (raises, no reply, a check or a bound) is dropped for the round with a
  reason; ``robust.fatal_drops`` makes the first drop stop the run;
* an aggregation error stops the run: every update had passed its checks, so the error is
  the method's or the server state's, and the strategy may be half-updated; the last
  checkpoint (the round before) is intact;
* local DP accounts every client that was sent a payload, whether or not its update is used
  and whatever it reports, with the DP-SGD steps its spec implies; central DP accounts a round
  when noise was released.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlora.core.accounting import PrivacyLedger
from fedlora.core.contract import (
    ClientSpec,
    ClientUpdate,
    FedLoraError,
    Payload,
    Strategy,
    check_update,
    payload_nbytes,
    update_nbytes,
)
from fedlora.core.robust import (
    NormBound,
    NormHistory,
    Start,
    WeightBound,
    screen_updates,
    start_of,
)

LOG = logging.getLogger("fedlora.federation")


@dataclass
class Server:
    """The server side of a federation: the strategy, the norm bounds of the screen, the
    privacy ledger (None without DP), whether a drop stops the run, and the bytes of a float32
    full fine-tuning update of the same modules (one way), for the communication ratio; the
    weight bound (the counts the server registered) and the norm history (checkpointed with
    `server_state`)."""

    strategy: Strategy
    bound: NormBound = field(default_factory=NormBound)
    weights: WeightBound = field(default_factory=WeightBound)
    history: NormHistory = field(default_factory=NormHistory)
    ledger: PrivacyLedger | None = None
    fatal_drops: bool = False
    full_ft: int = 0
    shapes: dict[str, tuple[int, int]] | None = None  # checked against, when set
    sampling: str = "fixed"  # "poisson": each client with probability k / candidates


@dataclass
class Reply:
    """A sampled client's answer to `payload`: its update, or why it has none (``error``)."""

    spec: ClientSpec
    payload: Payload
    update: ClientUpdate | None = None
    error: str | None = None


@dataclass
class RoundTally:
    """What a round's steps count: bytes (as data: `payload_nbytes`, `update_nbytes`),
    replies, training time, and per client its loss and contribution norm (kept updates), why
    it was dropped, or the fraction kept by a clip."""

    down: int = 0
    up: int = 0
    replies: int = 0
    t_train: float = 0.0
    clients: list[str] = field(default_factory=list)
    losses: list[tuple[float, int]] = field(default_factory=list)
    used: list[str] = field(default_factory=list)
    weights: dict[str, int] = field(default_factory=dict)  # used client -> its bounded count
    norms: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)
    sent: list[ClientSpec] = field(default_factory=list)  # accounted under local DP
    sample_rate: float = 1.0  # this round's client sampling rate (central DP's accountant)
    capped: dict[str, list[int]] = field(default_factory=dict)  # client -> [reported, used]
    counts: list[int] = field(default_factory=list)  # the round's reported counts (if needed)


def new_totals() -> dict[str, int]:
    """The running totals a run carries from round to round (and checkpoints)."""
    return {"bytes_down": 0, "bytes_up": 0, "participations": 0}


def make_sampler(seed: int, ledger: PrivacyLedger | None = None) -> np.random.Generator:
    """The run's client sampler: from the public seed, or under a privacy mode from the
    server's secret (who is sampled is part of what the accountant assumes is random)."""
    if ledger is None:
        return np.random.default_rng([seed, 7])
    s, mask = ledger.secret, (1 << 64) - 1
    return np.random.default_rng([s & mask, (s >> 64) & mask, 7])


def sync_privacy(server: Server) -> None:
    """After a ledger was restored (resume): the central mechanism draws from the ledger's
    secret with its noise multiplier and clip norm (a run whose rounds grew keeps the sigma
    it was accounted with)."""
    dp, ledger = server.strategy.privacy, server.ledger
    if dp is None or ledger is None:
        return
    dp.secret, dp.noise_multiplier = ledger.secret, ledger.noise_multiplier
    if ledger.clip is not None:
        dp.clip_norm = ledger.clip


def sample(sampler: np.random.Generator, candidates: Sequence[Any], k: int) -> list[Any]:
    """`k` of `candidates` drawn without replacement by `sampler` (seeded and checkpointed by
    the engine), in the candidates' order."""
    picked = sampler.choice(len(candidates), k, replace=False)
    return [candidates[int(i)] for i in sorted(picked)]


def draw(
    server: Server,
    sampler: np.random.Generator,
    candidates: Sequence[Any],
    k: int,
    tally: RoundTally,
) -> list[Any]:
    """Step 1: the round's clients: `k` of `candidates` (all when fewer), or with Poisson
    sampling each independently with probability ``k / len(candidates)`` (possibly none); the
    rate goes to the tally for the accountant."""
    n = len(candidates)
    tally.sample_rate = min(1.0, k / n) if n else 0.0
    if server.ledger is not None:
        return _private_draw(server, sampler, candidates, k, tally.sample_rate)
    if server.sampling == "poisson":
        keep = sampler.random(n) < tally.sample_rate
        return [c for c, x in zip(candidates, keep) if x]
    return sample(sampler, candidates, min(k, n))


def _private_draw(
    server: Server, sampler: np.random.Generator, candidates: Sequence[Any], k: int, rate: float
) -> list[Any]:
    """Under a privacy mode, who is sampled comes from SHAKE-256 keyed by the whole server
    secret (`fedlora.core.privacy.secret_uniform`); the checkpointed `sampler` only supplies a
    nonce per round, so a resumed run draws what an uninterrupted one would, and knowing the
    nonce (or any 64 bits) does not reveal the draw. Poisson: each candidate with probability
    `rate`; fixed: the `k` candidates with the smallest keyed uniforms (a uniform k-subset)."""
    from fedlora.core.privacy import secret_uniform

    nonce = int(sampler.integers(0, 2**63))
    assert server.ledger is not None
    u = secret_uniform(server.ledger.secret, len(candidates), "client-sampling", nonce)
    if server.sampling == "poisson":
        return [c for c, x in zip(candidates, u < rate) if x]
    picked = np.argsort(u, kind="stable")[: min(k, len(candidates))]
    return [candidates[int(i)] for i in sorted(picked)]


def drop(server: Server, tally: RoundTally, rnd: int, client: str, reason: str) -> None:
    """Drop `client` for round `rnd` with `reason` (stops the run under ``fatal_drops``)."""
    tally.dropped[client] = reason
    LOG.warning("round %d: client %s dropped: %s", rnd, client, reason)
    if server.fatal_drops:
        raise FedLoraError(f"round {rnd}: client {client} dropped: {reason} (robust.fatal_drops)")


def configure(server: Server, rnd: int, spec: ClientSpec, tally: RoundTally) -> Payload | None:
    """Step 2: the payload of `spec` for round `rnd`, counted; None (and the client's drop)
    when the strategy cannot configure it: nothing is sent to it."""
    tally.clients.append(spec.client_id)
    try:
        payload = server.strategy.configure(spec, rnd)
    except FedLoraError as e:
        drop(server, tally, rnd, spec.client_id, f"cannot configure: {e}")
        return None
    tally.down += payload_nbytes(payload)
    tally.sent.append(spec)
    return payload


def accept(
    server: Server, rnd: int, reply: Reply, tally: RoundTally
) -> tuple[ClientUpdate, Start] | None:
    """Step 3: count `reply` and check its update against its payload; None (and a drop with
    the reason) when it has no usable update."""
    spec, update = reply.spec, reply.update
    if update is not None:
        tally.replies += 1
        tally.up += update_nbytes(update, reply.payload.trainable)
    if reply.error is not None or update is None:
        drop(server, tally, rnd, spec.client_id, reply.error or "no reply")
        return None
    try:
        check_update(server.strategy, rnd, spec, reply.payload, update, shapes=server.shapes)
        start = start_of(update, reply.payload)
    except Exception as e:  # noqa: BLE001 - whatever a reply holds, it is a drop, not a crash
        bad = str(e) if isinstance(e, FedLoraError) else f"malformed: {type(e).__name__}: {e}"
        drop(server, tally, rnd, spec.client_id, bad)
        return None
    n, why = server.weights.bound(spec.client_id, update.num_examples, tally.counts)
    if why is not None:
        LOG.warning("round %d: client %s weighs %d: %s", rnd, spec.client_id, n, why)
        tally.capped[spec.client_id] = [update.num_examples, n]
        update = dataclasses.replace(update, num_examples=n)
    return update, start


def screen(
    server: Server, rnd: int, items: Iterable[tuple[ClientUpdate, Start]], tally: RoundTally
) -> Iterator[ClientUpdate]:
    """Step 4: the norm bounds (`fedlora.core.robust.screen_updates`). A relative bound needs
    the round's norms, so the round is gathered first; an absolute one screens the stream."""
    batches = [list(items)] if server.bound.needs_round else ([item] for item in items)
    for batch in batches:
        result = screen_updates(batch, server.bound, history=server.history)
        tally.norms.update(result.norms)
        tally.clipped.update(result.clipped)
        for client, reason in result.dropped.items():
            drop(server, tally, rnd, client, reason)
        for u in result.kept:
            if "train_loss" in u.extras:  # a local-DP client releases none
                tally.losses.append((float(u.extras["train_loss"]), u.num_examples))
            tally.used.append(u.client_id)
            tally.weights[u.client_id] = u.num_examples  # as bounded by the server
            yield u


def aggregate(server: Server, rnd: int, updates: Iterator[ClientUpdate]) -> bool:
    """Step 5: fold the kept updates into the strategy; with none, leave the global model
    unchanged, except under central DP, where the round still releases (noise only). Returns
    whether anything was released. An aggregation error stops the run (see the module
    docstring)."""
    first = next(updates, None)
    if first is None and server.strategy.privacy is None:
        LOG.warning("round %d: no usable update; the global model is unchanged", rnd)
        return False
    stream = updates if first is None else itertools.chain([first], updates)
    try:
        server.strategy.aggregate(rnd, stream)
    except FedLoraError as e:
        raise FedLoraError(f"round {rnd}: aggregation failed: {e}") from None
    return True


def account(server: Server, rnd: int, tally: RoundTally, aggregated: bool) -> dict[str, float]:
    """The round's privacy records: ``{"epsilon": ...}`` (nothing without DP); an adaptive
    clip norm moves (`fedlora.core.privacy.CentralDP.end_round`)."""
    ledger = server.ledger
    if ledger is None:
        return {}
    if ledger.mode == "local":
        for spec in tally.sent:
            ledger.record_local(spec.client_id, spec.num_examples or 1)
        return {"epsilon": ledger.epsilon()}
    out: dict[str, float] = {}
    if aggregated:  # central: a round counts when noise was released
        ledger.record_central(tally.sample_rate)
        dp = server.strategy.privacy
        out["dp_clip_norm"] = dp.clip_norm
        dp.end_round(rnd)
        if dp.adaptive is not None:
            ledger.clip = dp.clip_norm
    out["epsilon"] = ledger.epsilon()
    return out


def round_row(
    server: Server, rnd: int, tally: RoundTally, aggregated: bool, totals: dict[str, int]
) -> dict[str, Any]:
    """Step 6: the round's metrics row (``kind="round"``), after `account`; `totals` grow."""
    totals["bytes_down"] += tally.down
    totals["bytes_up"] += tally.up
    totals["participations"] += tally.replies
    n_total = sum(n for _, n in tally.losses)
    privacy = account(server, rnd, tally, aggregated)
    row = {
        "kind": "round",
        "round": rnd,
        "clients": list(tally.clients),
        "replies": tally.replies,
        "used": len(tally.used),
        "aggregated": aggregated,
        "dropped": dict(tally.dropped),
        "clipped": dict(tally.clipped),
        "capped_weights": dict(tally.capped),
        "update_norms": dict(tally.norms),
        "train_loss": sum(v * n for v, n in tally.losses) / n_total if n_total else None,
        "bytes_down": tally.down,
        "bytes_up": tally.up,
        "bytes_down_total": totals["bytes_down"],
        "bytes_up_total": totals["bytes_up"],
        "full_ft_bytes_total": 2 * server.full_ft * totals["participations"],
        **privacy,
    }
    return withhold_private(row) if server.ledger is not None else row


#: what a round row holds per client, unnoised, that no epsilon covers: exact update norms,
#: the fraction a clip kept (a norm too), reported example counts; the loss is the mean of
#: the clients' raw losses. Under a privacy mode they never reach a shared file.
PRIVATE_ROW_KEYS = ("update_norms", "clipped", "capped_weights")
WITHHELD = (
    "privacy mode: per-client update norms, clip fractions, example counts, losses and "
    "timings are not published (the epsilon does not cover them)"
)


def withhold_private(row: dict[str, Any]) -> dict[str, Any]:
    """`row` without the unnoised per-client values of `PRIVATE_ROW_KEYS`, its train loss
    None and a ``withheld`` note (the shape consumers read stays)."""
    for key in PRIVATE_ROW_KEYS:
        row.pop(key, None)
    row["train_loss"] = None
    row["withheld"] = WITHHELD
    return row


def public_result(result: dict[str, Any], ledger: PrivacyLedger | None) -> dict[str, Any]:
    """A Flower ``result.json`` as it may be shared: under a privacy mode, the ledger without
    its secret (`PrivacyLedger.public_state`) and every round without what
    `withhold_private` removes, the clients' metrics (losses, ``train_seconds``) and their
    means; the traffic counters and the epsilon stay. Without privacy: `result` unchanged."""
    if ledger is None:
        return result
    out = dict(result, privacy_ledger=ledger.public_state())
    out["rounds"] = []
    for r in result.get("rounds", []):
        r = withhold_private(dict(r))
        metrics = r.pop("metrics", None) or {}
        r["metrics"] = {k: v for k, v in metrics.items() if k in PUBLIC_FLOWER_METRICS}
        r.pop("client_metrics", None)
        out["rounds"].append(r)
    return out


#: the Flower strategy's round metrics that are counters (not the clients' extras)
PUBLIC_FLOWER_METRICS = (
    "replies-sent",
    "replies-received",
    "replies-used",
    "replies-dropped",
    "download-bytes",
    "download-payload-nbytes",
    "upload-bytes",
    "upload-trained-nbytes",
    "epsilon",
)


def close_round(
    server: Server,
    rnd: int,
    replies: Iterable[Reply],
    tally: RoundTally,
    totals: dict[str, int],
) -> dict[str, Any]:
    """Steps 3-6 over `replies` (consumed lazily: a streaming strategy holds one update at a
    time): the round's row. The same in every engine. A weight bound without registered
    counts needs the round's reported counts: the replies are gathered first."""
    if server.weights.needs_round:
        replies = list(replies)
        tally.counts = [n for r in replies if _count(n := getattr(r.update, "num_examples", 0))]
    items = (item for r in replies if (item := accept(server, rnd, r, tally)) is not None)
    aggregated = aggregate(server, rnd, screen(server, rnd, items, tally))
    kept = set(tally.used) - set(tally.clipped)
    server.history.end_round(server.bound, [n for c, n in tally.norms.items() if c in kept])
    return round_row(server, rnd, tally, aggregated, totals)


def _count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def server_state(server: Server) -> dict[str, Any]:
    """The server state a resumed run needs beyond the strategy and the privacy ledger."""
    return {"norm_history": server.history.state_dict()}


def load_server_state(server: Server, state: Mapping[str, Any]) -> None:
    """Restore `server_state` (a checkpoint without it: a fresh history)."""
    server.history.load_state_dict(dict(state.get("norm_history") or {}))


def run_summary(
    cfg: Any,
    rows: Sequence[dict[str, Any]],
    totals: dict[str, int],
    full_ft: int,
    specs: Sequence[ClientSpec],
    training_clients: int,
) -> dict[str, Any]:
    """A run's ``summary.json`` from its rows: the final evaluation per set, bytes against
    full fine-tuning, drops and clips per round, times (rows without times count 0)."""
    final: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["kind"] == "eval":
            final[r["set"]] = {
                k: v
                for k, v in r.items()
                if k not in ("kind", "set") and not k.startswith(("time_", "mem_"))
            }
    rounds = [r for r in rows if r["kind"] == "round"]
    lora = totals["bytes_down"] + totals["bytes_up"]
    full = 2 * full_ft * totals["participations"]
    ranks = [sum(s.ranks.values()) / len(s.ranks) for s in specs]
    return {
        "name": cfg.name,
        "strategy": cfg.strategy.name,
        "model": cfg.model.name,
        "rounds": len(rounds),
        "num_clients": len(specs),
        "training_clients": training_clients,
        "mean_rank": sum(ranks) / len(ranks),
        "bytes_down": totals["bytes_down"],
        "bytes_up": totals["bytes_up"],
        "bytes_total": lora,
        "full_ft_bytes": full,
        "comm_ratio_vs_full_ft": lora / full if full else None,
        "final": final,
        # per round with any: client -> why it was dropped / the fraction of it kept by a clip
        "dropped": {str(r["round"]): r["dropped"] for r in rounds if r.get("dropped")},
        "clipped": {str(r["round"]): r["clipped"] for r in rounds if r.get("clipped")},
        "rounds_without_update": [r["round"] for r in rounds if not r.get("aggregated", True)],
        "time_train": sum(r.get("time_train", 0.0) for r in rounds),
        "time_aggregate": sum(r.get("time_aggregate", 0.0) for r in rounds),
        "time_eval": sum(r.get("time_eval", 0.0) for r in rounds),
        "time_total": sum(r.get("time_round", 0.0) for r in rounds),
    }


def round_line(row: dict[str, Any], total: int, eval_rows: Sequence[dict[str, Any]] = ()) -> str:
    """A round row (and its seen-clients evaluation) as one log line."""
    seen = next((r for r in eval_rows if r["set"] == "seen_clients"), None)
    loss = row["train_loss"]
    return (
        f"round {row['round']}/{total}: train loss {'-' if loss is None else f'{loss:.4f}'}"
        + (f", eval loss {seen['loss']:.4f}" if seen and "loss" in seen else "")
        + f", {row['used']} of {len(row['clients'])} clients used"
        + ("" if row["aggregated"] else " (no usable update: global model unchanged)")
        + f", up {fmt_bytes(row['bytes_up'])} down {fmt_bytes(row['bytes_down'])}"
        + (f", {row['time_round']:.1f}s" if "time_round" in row else "")
    )


def fmt_bytes(n: float | None) -> str:
    """A byte count for logs and tables (``160.6 MB``; ``-`` for none)."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover
