"""Zero-padding: heterogeneous-rank FedAvg by padding every client's factors to the largest rank.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024, sec. 3 (the zero-padding baseline): ``A = sum_k p_k pad(A_k)``,
``B = sum_k p_k pad(B_k)``; a client of rank r receives the first r slots.

``restart=True`` (an ablation, not the baseline's method): like FLoRA, merge each round's
``mean(pad(scale B)) mean(pad(A))`` into the base and start every client from a fresh LoRA at
its own rank (FLoRA's seed); it separates FLoRA's two changes under heterogeneous ranks, as
FedIT's ``restart`` does under homogeneous ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fedlora.core.contract import (
    Adapter,
    ClientSpec,
    ClientUpdate,
    LoraFactors,
    Payload,
    Strategy,
)
from fedlora.core.privacy import private_factor_release
from fedlora.strategies import register
from fedlora.strategies.base import (
    factored,
    merge_product,
    padded_mean,
    restart_payload,
    restart_problems,
    truncate_for,
)


@register
class ZeroPad(Strategy):
    """Pad to the round's largest rank, average A and B, truncate per client (under central
    DP: the configuration's largest rank, `fedlora.core.privacy.private_factor_release`)."""

    name = "zero_pad"
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

    def client_ranks(self, client: ClientSpec) -> dict[str, int]:
        """The ranks `client` trains this round (HetLoRA lowers them after self-pruning)."""
        return dict(client.ranks)

    def configure(self, client: ClientSpec, server_round: int) -> Payload:
        if self.restart:  # the merged total as the base, a fresh LoRA from FLoRA's seed
            return restart_payload(self, client, server_round, self.total)
        if not self.A:
            return self.expect(client, Payload(None, None, seed=self.seed))
        ranks = self.client_ranks(client)
        adapter = truncate_for(client, self.A, self.G, self.seed, ranks)
        return self.expect(client, Payload(None, adapter, extras=self.client_extras(client)))

    def client_extras(self, client: ClientSpec) -> dict:
        return {}

    def aggregation_weights(self, updates: list[ClientUpdate]) -> list[float]:
        return self.weights(updates)

    def aggregate(self, server_round: int, updates: Iterable[ClientUpdate]) -> None:
        updates = self.check_updates(server_round, updates)
        self.aggregate_dense(server_round, updates)
        if self.privacy is not None:  # the configured global rank, fixed 1 / K
            private_factor_release(self, server_round, updates)
            return
        w = self.aggregation_weights(updates)
        for module in updates[0].adapter:
            rank = max(u.adapter[module].rank for u in updates)
            A, G = padded_mean(updates, w, module, rank)
            if self.restart:
                merge_product(self.total, module, A, G)
            else:
                self.A[module], self.G[module] = A, G

    def global_delta(self) -> Adapter:
        return dict(self.total) if self.restart else factored(self.A, self.G)
