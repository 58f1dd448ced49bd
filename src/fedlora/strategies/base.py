"""Pieces shared by the strategies that keep a global A and B (FedIT, zero-padding, HetLoRA,
FFA-LoRA, FedEx-LoRA): averages of padded factors and per-client truncation.

Server-side factors are kept as (A, G) with G = scale * B in float64, so that clients with
different alphas or ranks combine on their effective deltas ``G @ A``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from fedlora.core.contract import (
    Adapter,
    ClientSpec,
    ClientUpdate,
    FedLoraError,
    LoraFactors,
    Payload,
    Strategy,
    init_lora_A,
    module_seed,
)
from fedlora.core.linalg import LowRankSum

F64 = torch.float64


def padded_mean(
    updates: list[ClientUpdate], weights: list[float], module: str, rank: int
) -> tuple[Tensor, Tensor]:
    """``(sum_k w_k pad(A_k), sum_k w_k pad(scale_k B_k))``, zero-padded to `rank` slots."""
    f0 = updates[0].adapter[module]
    d_out, d_in = f0.shape
    A = torch.zeros(rank, d_in, dtype=F64)
    G = torch.zeros(d_out, rank, dtype=F64)
    for u, w in zip(updates, weights):
        f = u.adapter[module]
        A[: f.rank] += w * f.A.to(F64)
        G[:, : f.rank] += w * f.scaled_B()
    return A, G


def round_seed(seed: int, server_round: int) -> int:
    """The seed of a round's fresh LoRA modules, shared by the round's clients (FLoRA, and
    FedIT with ``restart``: the same seed, so the two differ only in their aggregation)."""
    return module_seed(seed, "flora-round", server_round) % (2**31)


def merge_total(total: dict[str, LoraFactors], module: str, acc: LowRankSum) -> None:
    """Fold `module`'s accumulated delta (``total``, compact exact factors) into the round's
    sum `acc` and keep the result as the new total."""
    if module in total:
        acc.add(total[module].scaled_B(), total[module].A)
    total[module] = acc.factors()


# -- ``restart`` (an ablation of FedIT and zero-padding): FLoRA's restart without its stacking --


def restart_problems(name: str, options: Mapping[str, Any], privacy_mode: str) -> list[str]:
    """The ``restart`` option's rule: central DP releases the global factors, which a restart
    discards each round, so the two are refused together."""
    if privacy_mode == "central" and options.get("restart"):
        return [
            f"strategy.options.restart: {name}'s central DP releases the global factors, "
            "which a restart discards each round; set it to false with privacy.mode = "
            "'central'"
        ]
    return []


def restart_payload(
    strategy: Strategy, client: ClientSpec, server_round: int, total: Mapping[str, LoraFactors]
) -> Payload:
    """A restarted client's payload: the merged `total` as its base and a fresh LoRA at its
    own ranks from FLoRA's seed of the round (`round_seed`)."""
    merge = dict(total) if total else None
    seed = round_seed(strategy.seed, server_round)
    return strategy.expect(client, Payload(merge, None, seed=seed))


def merge_product(total: dict[str, LoraFactors], module: str, A: Tensor, G: Tensor) -> None:
    """Fold a round's aggregate ``G @ A`` (the product of the averaged factors) into `total`."""
    acc = LowRankSum((G.shape[0], A.shape[1]))
    acc.add(G, A)
    merge_total(total, module, acc)


def truncate_for(
    client: ClientSpec,
    A: dict[str, Tensor],
    G: dict[str, Tensor],
    seed: int,
    ranks: dict[str, int] | None = None,
) -> Adapter:
    """The client's first r slots of the global factors (B = G / client scale).

    Slots beyond the global rank get fresh A rows from the shared seed and B = 0, so they can
    learn (A = B = 0 would have zero gradient).
    """
    out: Adapter = {}
    for module, r in (ranks or client.ranks).items():
        if module not in A:
            raise FedLoraError(
                f"client {client.client_id}: module {module} is not in the global model"
            )
        s = client.scale(module)
        a, g = A[module], G[module]
        k = min(r, a.shape[0])
        a_r = torch.cat(
            [a[:k], init_lora_A(seed, module, r - k, a.shape[1], first_row=k, dtype=F64)]
        )
        g_r = torch.cat([g[:, :k], torch.zeros(g.shape[0], r - k, dtype=F64)], 1)
        out[module] = LoraFactors(a_r.float(), (g_r / s).float(), s)
    return out


def homogeneous_ranks(updates: list[ClientUpdate], strategy: str, server_round: int) -> None:
    """Raise unless every client sent the same rank per module (FedIT, FedEx-LoRA)."""
    if not updates:
        return
    first = updates[0]
    for u in updates[1:]:
        for module, f in u.adapter.items():
            r0 = first.adapter[module].rank
            if f.rank != r0:
                raise FedLoraError(
                    f"{strategy}: round {server_round}, module {module}: client {u.client_id} "
                    f"has rank {f.rank} but client {first.client_id} has rank {r0}; {strategy} "
                    "averages A and B separately and needs homogeneous ranks (use zero_pad, "
                    "hetlora, flexlora or flora for heterogeneous ranks)"
                )


def factored(A: dict[str, Tensor], G: dict[str, Tensor]) -> Adapter:
    """Global delta ``G @ A`` per module as scale-1 factors."""
    return {m: LoraFactors(A[m].clone(), G[m].clone(), 1.0) for m in A}


def streamed_sums(
    strategy: Strategy,
    server_round: int,
    updates: Iterable[ClientUpdate],
    dense_rank: int | None = None,
    previous: dict[str, LowRankSum] | None = None,
) -> dict[str, LowRankSum]:
    """Per module, ``sum_k p_k scale_k B_k A_k`` over the round's updates, streamed: each
    update is validated, folded into the accumulators and dropped, so memory is bounded by the
    stacked factors (or one dense matrix per module), not by the number of clients. The raw
    weights are normalised once the stream ends. The updates' dense tensors (a classifier
    head) are averaged in the same pass and become the strategy's global ones at the end.

    Under central DP (``strategy.privacy``) the sum is instead ``previous + (1/K) sum_k
    c_k (delta_k - start_k)`` (`fedlora.core.privacy.delta_update_terms`; `previous`: the
    global delta the clients started from, none for a strategy that adds the round's sum to
    its own total) plus the round's noise (dense: every module's sum becomes dense), for
    every module, whoever was sampled."""
    if strategy.privacy is not None:
        return _private_sums(strategy, server_round, updates, dense_rank, previous)
    sums: dict[str, LowRankSum] = {}
    total = 0.0
    dense = strategy.dense_mean(server_round)
    for u in strategy.iter_checked(server_round, updates):
        w = strategy.raw_weight(u)
        total += w
        dense.add(u, w)
        for module, f in u.adapter.items():
            acc = sums.setdefault(module, LowRankSum(f.shape, dense_rank=dense_rank))
            acc.add(f.scaled_B(), f.A, w)
    strategy.commit_dense(dense)
    return {m: acc.scale_(1.0 / total) for m, acc in sums.items()}


def _private_sums(strategy, server_round, updates, dense_rank, previous) -> dict[str, LowRankSum]:
    from fedlora.core.privacy import check_finite_release, delta_update_terms, pop_start

    dp = strategy.privacy
    sums = {m: LowRankSum(strategy.shapes[m], dense_rank=dense_rank) for m in dp.ranks}
    for m, prev in (previous or {}).items():
        if prev.is_dense:
            sums[m].add_dense(prev.dense())
        else:
            for g, h in zip(prev.G, prev.H):
                sums[m].add(g, h)
    dense = strategy.dense_mean(server_round)
    for u in strategy.iter_checked(server_round, updates):
        dense.add(u, 1.0)
        # clients are configured as the stream trains them: each start is taken when used
        terms = delta_update_terms(u, pop_start(strategy, u.client_id), dp)[0]
        for module, parts in terms.items():
            for G, A, c in parts:
                sums[module].add(G, A, dp.weight * c)
    strategy.commit_dense(dense)
    strategy.dp_starts = {}  # a sampled client that sent nothing moves nothing
    if dp.noise_multiplier > 0:
        for module in sorted(sums):
            sums[module].add_dense(dp.noise(sums[module].shape, server_round, f"delta/{module}"))
            check_finite_release(sums[module].dense(), f"delta/{module}")
    return sums
