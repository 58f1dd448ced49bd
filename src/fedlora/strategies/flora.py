"""FLoRA: exact aggregation of heterogeneous ranks by stacking, merged into the base.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024, sec. 3, eq. (5)-(6): stacking the clients' factors,
``[p_1 B_1, ..., p_K B_K] @ [A_1; ...; A_K] = sum_k p_k B_k A_k``, gives the round's global
update exactly; it is merged into the base weights and clients start fresh LoRA modules each
round.

Clients are stateless here: ``payload.merge`` carries the whole accumulated delta since the
original base (kept exactly, compressed to its numerical rank), so a client that sat out rounds
still starts from the current global model, and partial participation loses no merge.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedlora.core.contract import (
    Adapter,
    ClientSpec,
    ClientUpdate,
    LoraFactors,
    Payload,
    Strategy,
)
from fedlora.strategies import register
from fedlora.strategies.base import merge_total, restart_payload, streamed_sums


@register
class FLoRA(Strategy):
    """Stack client deltas each round; accumulate them into the global base delta."""

    name = "flora"
    dp_released = "delta"

    def __init__(self, *, dense_rank: int | None = None, **options) -> None:
        super().__init__(**options)
        self.dense_rank = dense_rank
        self.total: dict[str, LoraFactors] = {}  # accumulated delta, compact exact factors

    def configure(self, client: ClientSpec, server_round: int) -> Payload:
        # fresh LoRA every round, from a seed shared by the round's clients
        return restart_payload(self, client, server_round, self.total)

    def aggregate(self, server_round: int, updates: Iterable[ClientUpdate]) -> None:
        # the round's exact sum (streamed), then the previous total joins it
        for module, acc in streamed_sums(self, server_round, updates, self.dense_rank).items():
            merge_total(self.total, module, acc)

    def global_delta(self) -> Adapter:
        return dict(self.total)
