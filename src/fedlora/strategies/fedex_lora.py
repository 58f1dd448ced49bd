"""FedEx-LoRA: FedIT plus the exact residual folded into the frozen base.

Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models", ACL 2025, eq. (6)-(8): after averaging A and B,

    residual = sum_k p_k B_k A_k - (sum_k p_k B_k)(sum_k p_k A_k)

is added to the base weights, so base + B_avg A_avg equals the exact average of client models.
The accumulated residual since the original base is sent as ``payload.merge`` (exact factors,
compressed to numerical rank). Needs homogeneous ranks.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedlora.core.contract import Adapter, ClientSpec, ClientUpdate, LoraFactors, Payload
from fedlora.core.linalg import LowRankSum, stack
from fedlora.strategies import register
from fedlora.strategies.base import homogeneous_ranks, padded_mean
from fedlora.strategies.fedit import FedIT


@register
class FedExLoRA(FedIT):
    """Average A and B; fold the residual of the average into the base."""

    name = "fedex_lora"
    homogeneous_only = True
    dp_released = ""
    dp_refusal = (
        "it broadcasts both the factor averages and the exact average of the clients' "
        "products (its residual), two releases of every client's data per round with different "
        "sensitivities; use fedit (factor averages) or flexlora / flora (merged delta)"
    )

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.residual: dict[str, LoraFactors] = {}

    def configure(self, client: ClientSpec, server_round: int) -> Payload:
        payload = super().configure(client, server_round)
        payload.merge = dict(self.residual) if self.residual else None
        return payload

    def aggregate(self, server_round: int, updates: Iterable[ClientUpdate]) -> None:
        updates = self.check_updates(server_round, updates)
        homogeneous_ranks(updates, self.name, server_round)
        self.aggregate_dense(server_round, updates)
        w = self.weights(updates)
        for module, f in updates[0].adapter.items():
            A, G = padded_mean(updates, w, module, f.rank)
            acc = LowRankSum(f.shape)
            if module in self.residual:
                acc.add(self.residual[module].scaled_B(), self.residual[module].A)
            for u, wk in zip(updates, w):
                acc.add(u.adapter[module].scaled_B(), u.adapter[module].A, wk)
            acc.add(-G, A)
            self.residual[module] = acc.factors()
            self.A[module], self.G[module] = A, G

    def global_delta(self) -> Adapter:
        out = {}
        for m in self.A:
            parts = [LoraFactors(self.A[m], self.G[m], 1.0)]
            if m in self.residual and self.residual[m].rank:
                parts.append(self.residual[m])
            out[m] = stack(parts, [1.0] * len(parts))
        return out
