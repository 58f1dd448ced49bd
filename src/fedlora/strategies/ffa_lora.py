"""FFA-LoRA: federated LoRA with A frozen at a shared random init; only B is trained.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024, sec. 4:
with A_k = A fixed for every client, ``sum_k p_k B_k A = (sum_k p_k B_k) A``, so averaging B
is exact. Heterogeneous ranks stay exact: a client of rank r holds the first r rows of the
shared A (`fedlora.core.contract.init_lora_A` gives every row its own seed), and its B is
zero-padded. Needs ``shapes`` to initialise A before any update.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedlora.core.contract import (
    Adapter,
    ClientSpec,
    ClientUpdate,
    FedLoraError,
    LoraFactors,
    Payload,
    Strategy,
    init_lora_A,
)
from fedlora.core.privacy import private_factor_release
from fedlora.strategies import register

F64 = torch.float64


@register
class FFALoRA(Strategy):
    """Shared frozen A per module; average scale * B (padded to the largest rank)."""

    name = "ffa_lora"
    dp_released = "B"

    def __init__(self, **options) -> None:
        super().__init__(**options)
        if not self.shapes:
            raise FedLoraError("ffa_lora: needs the option shapes={module: (d_out, d_in)}")
        self.A: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}

    def shared_A(self, module: str, rank: int) -> torch.Tensor:
        """The first `rank` rows of the module's frozen A, grown on demand."""
        if module not in self.shapes:
            raise FedLoraError(f"ffa_lora: unknown module {module!r} (not in shapes)")
        d_out, d_in = self.shapes[module]
        have = self.A.get(module, torch.zeros(0, d_in, dtype=F64))
        if have.shape[0] < rank:
            extra = init_lora_A(self.seed, module, rank - have.shape[0], d_in, have.shape[0], F64)
            self.A[module] = have = torch.cat([have, extra])
            g = self.G.get(module, torch.zeros(d_out, 0, dtype=F64))
            self.G[module] = torch.cat([g, torch.zeros(d_out, rank - g.shape[1], dtype=F64)], 1)
        return have[:rank]

    def configure(self, client: ClientSpec, server_round: int) -> Payload:
        adapter = {}
        for module, r in client.ranks.items():
            A = self.shared_A(module, r)
            s = client.scale(module)
            adapter[module] = LoraFactors(A.float(), (self.G[module][:, :r] / s).float(), s)
        return self.expect(client, Payload(None, adapter, frozenset({"B"}), seed=self.seed))

    def check_update(self, server_round: int, update: ClientUpdate) -> None:
        super().check_update(server_round, update)
        for module, f in update.adapter.items():
            A = self.shared_A(module, f.rank).float()
            if not torch.allclose(f.A, A, rtol=1e-5, atol=1e-7):
                raise FedLoraError(
                    f"ffa_lora: round {server_round}, client {update.client_id}, module "
                    f"{module}: A differs from the shared frozen A (was it trained?)"
                )

    def aggregate(self, server_round: int, updates: Iterable[ClientUpdate]) -> None:
        updates = self.check_updates(server_round, updates)
        self.aggregate_dense(server_round, updates)
        if self.privacy is not None:  # B only: A is the shared, public one
            for module, rank in self.privacy.ranks.items():
                self.shared_A(module, rank)
            private_factor_release(self, server_round, updates, parts="B")
            return
        weights = self.weights(updates)
        for module in updates[0].adapter:
            G = torch.zeros_like(self.G[module])
            for u, w in zip(updates, weights):
                f = u.adapter[module]
                G[:, : f.rank] += w * f.scaled_B()
            self.G[module] = G

    def global_delta(self) -> Adapter:
        return {m: LoraFactors(self.A[m].clone(), self.G[m].clone(), 1.0) for m in self.G}
