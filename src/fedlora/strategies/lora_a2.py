"""LoRA-A2: alternating freeze of A and B, adaptive per-client rank selection.

Koo et al., "Towards Robust and Efficient Federated Low-Rank Adaptation with Heterogeneous
Clients" (LoRA-A2), 2024, sec. 4:

* Every client holds the global A and B of rank r_G. On odd rounds A is frozen and B trained,
  on even rounds the reverse (``freeze_a_on="odd"``; ``"even"`` swaps), so one factor moves
  per round and averaging it is exact: ``sum_k p_k dB_k A = (sum_k p_k dB_k) A``.
* A client with budget r_k (``sum`` of its per-module ranks, each capped at r_G) ranks every
  slot i of every module by its importance ``||dB[:, i] A[i, :]||_F`` (or
  ``||B[:, i] dA[i, :]||_F`` when A is trained) and uploads only its top slots across all modules
  (`select_slots`), with their indices in ``extras["slots"]``.
* The server aggregates the masked updates with data-size weights over all the round's
  clients, unselected slots contributing zero:
  ``B[:, i] += sum_k p_k m_{k,i} (B_k[:, i] - B[:, i])``; with ``renormalize=True`` each slot's
  weights are renormalised over the clients that uploaded it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from fedlora.contract import (
    Adapter,
    ClientSpec,
    ClientUpdate,
    FedLoraError,
    LoraFactors,
    Payload,
    Strategy,
    Trainable,
    init_lora_A,
)
from fedlora.strategies import register

F64 = torch.float64


@register
class LoRAA2(Strategy):
    """Global A/B of rank r_G; alternating freeze; masked, slot-selected uploads."""

    name = "lora_a2"
    dp_released = "trained"

    def __init__(
        self,
        *,
        global_rank: int = 8,
        alpha: float = 16.0,
        rslora: bool = False,
        freeze_a_on: str = "odd",
        renormalize: bool = False,
        **options,
    ) -> None:
        super().__init__(**options)
        if not self.shapes:
            raise FedLoraError("lora_a2: needs the option shapes={module: (d_out, d_in)}")
        if global_rank < 1:
            raise FedLoraError(f"lora_a2: global_rank must be >= 1, got {global_rank}")
        if freeze_a_on not in ("odd", "even"):
            raise FedLoraError(f"lora_a2: freeze_a_on must be 'odd' or 'even', got {freeze_a_on!r}")
        self.global_rank = global_rank
        self.scale = alpha / (global_rank**0.5 if rslora else global_rank)
        self.freeze_a_on = freeze_a_on
        self.renormalize = renormalize
        self.A = {
            m: init_lora_A(self.seed, m, global_rank, d_in, dtype=F64)
            for m, (_, d_in) in self.shapes.items()
        }
        self.B = {
            m: torch.zeros(d_out, global_rank, dtype=F64) for m, (d_out, _) in self.shapes.items()
        }
        self.budgets: dict[str, int] = {}

    def trainable(self, server_round: int) -> Trainable:
        odd = server_round % 2 == 1
        return frozenset({"B"}) if odd == (self.freeze_a_on == "odd") else frozenset({"A"})

    def budget(self, client: ClientSpec) -> int:
        """Total number of rank slots the client may upload, over all modules."""
        unknown = set(client.ranks) - set(self.shapes)
        if unknown:
            raise FedLoraError(
                f"lora_a2: client {client.client_id}: unknown modules {sorted(unknown)[:3]}"
            )
        return sum(min(r, self.global_rank) for r in client.ranks.values())

    def configure(self, client: ClientSpec, server_round: int) -> Payload:
        self.budgets[client.client_id] = budget = self.budget(client)
        adapter = {
            m: LoraFactors(self.A[m].float(), self.B[m].float(), self.scale) for m in self.shapes
        }
        return Payload(None, adapter, self.trainable(server_round), self.seed, {"budget": budget})

    def check_update(self, server_round: int, update: ClientUpdate) -> None:
        super().check_update(server_round, update)
        check_slots(update, self.global_rank, self.budgets.get(update.client_id), server_round)

    def dp_problem(self) -> str | None:
        """Why central DP cannot run with these options (None: it can)."""
        if self.renormalize:
            return (
                "renormalize = true divides each slot by the share of clients that uploaded it, "
                "a data-dependent denominator; set strategy.options.renormalize = false"
            )
        return None

    def aggregate(self, server_round: int, updates: Iterable[ClientUpdate]) -> None:
        updates = self.check_updates(server_round, updates, same_modules=False)
        trained = "B" if "B" in self.trainable(server_round) else "A"
        weights = self.weights(updates)
        if self.privacy is not None:  # clip each client's masked factor change to clip_norm
            weights = [w * self._dp_clip(u, trained) for u, w in zip(updates, weights)]
        for module in self.shapes:
            old = self.B[module] if trained == "B" else self.A[module].T  # slots as columns
            delta = torch.zeros_like(old)
            mass = torch.zeros(self.global_rank, dtype=F64)
            for u, w in zip(updates, weights):
                if module not in u.adapter:
                    continue
                idx = u.extras["slots"][module]
                f = u.adapter[module]
                new = f.B.to(F64) if trained == "B" else f.A.to(F64).T
                delta[:, idx] += w * (new - old[:, idx])
                mass[idx] += w
            if self.renormalize:
                delta /= torch.where(mass > 0, mass, torch.ones_like(mass))
            if self.privacy is not None and self.privacy.noise_multiplier > 0:
                delta += self.privacy.noise(delta.shape, server_round, f"{trained}/{module}")
            if trained == "B":
                self.B[module] = old + delta
            else:
                self.A[module] = (old + delta).T.contiguous()

    def global_delta(self) -> Adapter:
        return {m: LoraFactors(self.A[m].clone(), self.scale * self.B[m], 1.0) for m in self.shapes}

    def _dp_clip(self, u: ClientUpdate, trained: str) -> float:
        """The clip multiplier of `u`'s change of the trained factor on its uploaded slots."""
        from fedlora.norms import clip_factor

        sq = 0.0
        for module, f in u.adapter.items():
            idx = torch.as_tensor(u.extras["slots"][module])
            old = self.B[module][:, idx] if trained == "B" else self.A[module][idx]
            new = f.B.to(F64) if trained == "B" else f.A.to(F64)
            sq += float(((new - old) ** 2).sum())
        return clip_factor(sq**0.5, self.privacy.clip_norm)


def check_slots(u: ClientUpdate, global_rank: int, budget: int | None, server_round: int) -> None:
    """An upload's slot indices: present per module, in range, unique, matching its factors,
    and within the client's budget."""
    slots = u.extras.get("slots")
    who = f"lora_a2: round {server_round}, client {u.client_id}"
    if not isinstance(slots, Mapping) or set(slots) != set(u.adapter):
        raise FedLoraError(
            f"{who}: extras['slots'] must give slot indices for each uploaded module"
        )
    total = 0
    for module, idx in slots.items():
        idx = torch.as_tensor(idx)
        if idx.ndim != 1 or idx.numel() != u.adapter[module].rank:
            raise FedLoraError(
                f"{who}, module {module}: {idx.numel()} slot indices "
                f"for rank {u.adapter[module].rank}"
            )
        if idx.numel() and (
            idx.min() < 0 or idx.max() >= global_rank or idx.unique().numel() != idx.numel()
        ):
            raise FedLoraError(
                f"{who}, module {module}: slot indices must be unique in [0, {global_rank})"
            )
        total += idx.numel()
    if budget is not None and total > budget:
        raise FedLoraError(f"{who}: uploaded {total} slots, over its budget of {budget}")


def slot_importance(before: LoraFactors, after: LoraFactors, trained: str) -> Tensor:
    """Per-slot importance ``||dB[:, i] A[i, :]||_F`` (B trained) or ``||B[:, i] dA[i, :]||_F``
    (A trained); for an outer product this is the product of the two vectors' norms."""
    if trained == "B":
        return (after.B - before.B).norm(dim=0) * after.A.norm(dim=1) * abs(after.scale)
    return after.B.norm(dim=0) * (after.A - before.A).norm(dim=1) * abs(after.scale)


def select_slots(
    before: Adapter, after: Adapter, trainable: Trainable, budget: int
) -> dict[str, Tensor]:
    """LoRA-A2's client-side selection: the `budget` most important slots over all modules.

    Returns module -> sorted slot indices (modules with no selected slot are left out). Ties
    are broken by module order then slot index, so the choice is deterministic.
    """
    trained = "B" if "B" in trainable else "A"
    scores, owners = [], []
    for module in sorted(after):
        s = slot_importance(before[module], after[module], trained).to(F64)
        scores.append(s)
        owners += [(module, i) for i in range(s.numel())]
    if not scores:
        return {}
    flat = torch.cat(scores)
    order = sorted(range(flat.numel()), key=lambda j: (-float(flat[j]), j))[: max(budget, 0)]
    chosen: dict[str, list[int]] = {}
    for j in order:
        module, i = owners[j]
        chosen.setdefault(module, []).append(i)
    return {m: torch.tensor(sorted(v), dtype=torch.long) for m, v in chosen.items()}


def masked_upload(after: Adapter, slots: Mapping[str, Tensor]) -> Adapter:
    """The factors restricted to the selected slots: what a LoRA-A2 client sends."""
    return {
        m: LoraFactors(after[m].A[idx].clone(), after[m].B[:, idx].clone(), after[m].scale)
        for m, idx in slots.items()
    }
