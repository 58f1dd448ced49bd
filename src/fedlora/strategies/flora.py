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

from fedlora.contract import (
    Adapter,
    ClientSpec,
    ClientUpdate,
    LoraFactors,
    Payload,
    Strategy,
    module_seed,
)
from fedlora.linalg import LowRankSum
from fedlora.strategies import register


@register
class FLoRA(Strategy):
    """Stack client deltas each round; accumulate them into the global base delta."""

    name = "flora"

    def __init__(self, *, dense_rank: int | None = None, **options) -> None:
        super().__init__(**options)
        self.dense_rank = dense_rank
        self.total: dict[str, LoraFactors] = {}  # accumulated delta, compact exact factors

    def configure(self, client: ClientSpec, server_round: int) -> Payload:
        # fresh LoRA every round, from a seed shared by the round's clients
        seed = module_seed(self.seed, "flora-round", server_round) % (2**31)
        merge = dict(self.total) if self.total else None
        return self.expect(client, Payload(merge, None, seed=seed))

    def aggregate(self, server_round: int, updates: Iterable[ClientUpdate]) -> None:
        updates = self.check_updates(server_round, updates)
        weights = self.weights(updates)
        total = {}
        for module, f in updates[0].adapter.items():
            acc = LowRankSum(f.shape, dense_rank=self.dense_rank)
            if module in self.total:
                acc.add(self.total[module].scaled_B(), self.total[module].A)
            for u, w in zip(updates, weights):
                g = u.adapter[module]
                acc.add(g.scaled_B(), g.A, w)
            total[module] = acc.factors()
        self.total.update(total)

    def global_delta(self) -> Adapter:
        return dict(self.total)
