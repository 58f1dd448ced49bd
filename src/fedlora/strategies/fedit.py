"""FedIT: federated instruction tuning with FedAvg on LoRA factors.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024.
Server step: ``A = sum_k p_k A_k``, ``B = sum_k p_k B_k`` (p_k proportional to n_k), applied to
``scale_k * B_k`` so clients' scales combine. The product of averages is not the average of
products: `aggregation_noise` measures the gap, FLoRA's motivating figure (Wang et al. 2024,
fig. 1). Needs homogeneous ranks.

``restart=True`` (an ablation, not FedIT's method): like FLoRA, merge each round's aggregate
into the base and start every client from a fresh LoRA (FLoRA's seed), but aggregate FedIT's
way, ``mean(B) mean(A)``; it separates FLoRA's two changes, exact stacking and the restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fedlora.core.contract import (
    Adapter,
    ClientSpec,
    ClientUpdate,
    FedLoraError,
    LoraFactors,
    Payload,
    Strategy,
    validate_updates,
)
from fedlora.core.privacy import private_factor_release
from fedlora.strategies import register
from fedlora.strategies.base import (
    factored,
    homogeneous_ranks,
    merge_product,
    padded_mean,
    restart_payload,
    restart_problems,
    truncate_for,
)


@register
class FedIT(Strategy):
    """Average A and B separately (homogeneous ranks)."""

    name = "fedit"
    homogeneous_only = True
    dp_released = "factors"

    def __init__(self, *, restart: bool = False, **options) -> None:
        super().__init__(**options)
        self.restart = bool(restart)
        self.A: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}
        self.total: dict[str, LoraFactors] = {}  # restart: the merged deltas, exact factors

    @classmethod
    def option_problems(cls, options: Mapping[str, Any], privacy_mode: str = "none") -> list[str]:
        problems = super().option_problems(options, privacy_mode)
        return problems + restart_problems(cls.name, options, privacy_mode)

    def configure(self, client: ClientSpec, server_round: int) -> Payload:
        if self.restart:  # the merged total as the base, a fresh LoRA from FLoRA's seed
            return restart_payload(self, client, server_round, self.total)
        if not self.A:
            return self.expect(client, Payload(None, None, seed=self.seed))
        for module, r in client.ranks.items():
            if module in self.A and r != self.A[module].shape[0]:
                raise FedLoraError(
                    f"{self.name}: client {client.client_id}, module {module}: rank {r} differs "
                    f"from the global rank {self.A[module].shape[0]}; {self.name} needs "
                    "homogeneous ranks"
                )
        return self.expect(client, Payload(None, truncate_for(client, self.A, self.G, self.seed)))

    def aggregate(self, server_round: int, updates: Iterable[ClientUpdate]) -> None:
        updates = self.check_updates(server_round, updates)
        homogeneous_ranks(updates, self.name, server_round)
        self.aggregate_dense(server_round, updates)
        if self.privacy is not None:
            private_factor_release(self, server_round, updates)
            return
        w = self.weights(updates)
        for module, f in updates[0].adapter.items():
            A, G = padded_mean(updates, w, module, f.rank)
            if self.restart:
                merge_product(self.total, module, A, G)
            else:
                self.A[module], self.G[module] = A, G

    def global_delta(self) -> Adapter:
        return dict(self.total) if self.restart else factored(self.A, self.G)


def aggregation_noise(updates: Iterable[ClientUpdate], uniform: bool = False) -> dict[str, float]:
    """Per module, ``||mean(B) mean(A) - mean(B A)||_F / ||mean(B A)||_F`` (effective deltas).

    The relative error FedIT makes against the exact weighted sum of client deltas.
    """
    updates = validate_updates(0, updates, strategy="aggregation_noise")
    homogeneous_ranks(updates, "aggregation_noise", 0)
    n = sum(u.num_examples for u in updates)
    w = [1 / len(updates) if uniform else u.num_examples / n for u in updates]
    out = {}
    for module, f in updates[0].adapter.items():
        A, G = padded_mean(updates, w, module, f.rank)
        exact = sum(wk * u.adapter[module].delta() for u, wk in zip(updates, w))
        norm = torch.linalg.norm(exact)
        out[module] = float(torch.linalg.norm(G @ A - exact) / norm) if norm > 0 else 0.0
    return out
