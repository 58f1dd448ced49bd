"""HetLoRA: sparsity-weighted aggregation of heterogeneous ranks, with rank self-pruning.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024, sec. 3.2-3.3.

* Aggregation (eq. 3): clients' padded factors are averaged with weights
  ``S_k / sum_j S_j``, ``S_k = ||B_k A_k||_F`` (the norm of the client's effective delta), so
  sparse, low-information updates count less. With ``weighting="num_examples"`` (default) the
  weights are ``n_k S_k / sum_j n_j S_j``; ``weighting="uniform"`` gives the paper's exact
  formula.
* Distribution: a client of rank r receives the first r slots (truncation).
* Self-pruning (sec. 3.2, client side): the local loss adds
  ``lambda * ||B[:, k:] A[k:, :]||_F``, k = max(1, floor(gamma r)) (`self_pruning_penalty`); if
  that tail norm fell below the one the client reported last time, the client drops the tail
  and uploads rank k (`pruned_rank`); a rank-0 upload is rejected. The server remembers each
  client's pruned rank per module and never hands it more slots again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fedlora.core.contract import ClientSpec, ClientUpdate, FedLoraError, LoraFactors
from fedlora.strategies import register
from fedlora.strategies.zero_pad import ZeroPad

#: why hetlora refuses zero-padding's ``restart`` ablation
RESTART_REFUSED = (
    "hetlora has no restart: a fresh LoRA at the client's full ranks each round would undo its "
    "self-pruning (restart is zero_pad's ablation)"
)


@register
class HetLoRA(ZeroPad):
    """Sparsity-weighted zero-padded aggregation + client rank self-pruning."""

    name = "hetlora"
    rank_may_shrink = True

    def __init__(self, *, gamma: float = 0.99, prune_lambda: float = 0.0, **options) -> None:
        super().__init__(**options)
        if self.restart:  # a fresh LoRA at the spec's ranks each round would undo the pruning
            raise FedLoraError(f"strategy.options.restart: {RESTART_REFUSED}")
        if not 0 < gamma <= 1:
            raise ValueError(f"hetlora: gamma must be in (0, 1], got {gamma}")
        self.gamma = gamma
        self.prune_lambda = prune_lambda
        self.pruned: dict[str, dict[str, int]] = {}  # client -> module -> rank
        self.tail_norms: dict[str, dict[str, float]] = {}


    @classmethod
    def option_problems(cls, options: Mapping[str, Any], privacy_mode: str = "none") -> list[str]:
        problems = super().option_problems(options, privacy_mode)
        if options.get("restart"):
            problems.append(f"strategy.options.restart: {RESTART_REFUSED}")
        if privacy_mode != "none" and options.get("prune_lambda", 0) > 0:
            problems.append(
                "strategy.options.prune_lambda: hetlora's self-pruning lowers a client's rank "
                f"from its data, outside what privacy.mode = {privacy_mode!r} bounds (set it to 0)"
            )
        return problems
    def client_ranks(self, client: ClientSpec) -> dict[str, int]:
        pruned = self.pruned.get(client.client_id, {})
        return {m: min(r, pruned.get(m, r)) for m, r in client.ranks.items()}

    def client_extras(self, client: ClientSpec) -> dict:
        if self.prune_lambda <= 0:
            return {}
        return {
            "hetlora": {
                "gamma": self.gamma,
                "lambda": self.prune_lambda,
                "prev_tail_norms": dict(self.tail_norms.get(client.client_id, {})),
            }
        }

    def aggregation_weights(self, updates: list[ClientUpdate]) -> list[float]:
        base = self.weights(updates)
        if self.privacy is not None:
            # the sparsity weights S_k / sum_j S_j depend on every client's data, which the
            # clipping bound does not cover: central DP averages with the fixed 1 / K
            return base
        norms = [math.sqrt(sum(delta_sq_norm(f) for f in u.adapter.values())) for u in updates]
        raw = [b * s for b, s in zip(base, norms)]
        total = sum(raw)
        if total == 0:  # all deltas zero: the sparsity weights are undefined, keep the base ones
            return base
        return [x / total for x in raw]

    def aggregate(self, server_round, updates) -> None:
        updates = self.check_updates(server_round, updates)
        for u in updates:
            ranks = self.pruned.setdefault(u.client_id, {})
            for module, f in u.adapter.items():
                ranks[module] = min(ranks.get(module, f.rank), f.rank)
            if "hetlora_tail_norms" in u.extras:
                self.tail_norms[u.client_id] = dict(u.extras["hetlora_tail_norms"])
        super().aggregate(server_round, updates)


def delta_sq_norm(f: LoraFactors) -> float:
    """``||scale * B A||_F^2`` from the factors: ``scale^2 trace((B^T B)(A A^T))``, r x r work
    instead of a d_out x d_in product."""
    A, B = f.A.double(), f.B.double()
    return float(f.scale**2 * ((B.T @ B) * (A @ A.T)).sum())


def kept_rank(rank: int, gamma: float) -> int:
    """The rank pruning would keep: ``max(1, floor(gamma r))`` (a client never drops to 0)."""
    return max(1, math.floor(gamma * rank))


def self_pruning_penalty(A: Tensor, B: Tensor, gamma: float, scale: float = 1.0) -> Tensor:
    """``||scale * B[:, k:] A[k:, :]||_F`` with k = `kept_rank`: differentiable in A and B.

    The tail is what pruning would drop, so it is empty (penalty 0) when pruning cannot lower
    the rank (r = 1): the penalty never shrinks slots that can never be pruned. Computed from
    the factors (trace of small Gram products) without forming d_out x d_in.
    """
    k = kept_rank(A.shape[0], gamma)
    a, b = A[k:], B[:, k:]
    if a.shape[0] == 0:
        return A.sum() * 0.0
    # ||b a||_F^2 = trace((b^T b)(a a^T))
    sq = ((b.T @ b) * (a @ a.T)).sum()
    return scale * torch.sqrt(sq.clamp_min(1e-30))


def pruned_rank(rank: int, gamma: float, tail_norm: float, prev_tail_norm: float | None) -> int:
    """The rank a client keeps: floor(gamma r) when its tail norm decreased since last time."""
    if prev_tail_norm is not None and tail_norm < prev_tail_norm:
        return kept_rank(rank, gamma)
    return rank
