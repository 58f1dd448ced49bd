"""LoRA-A2: alternating freeze of A and B, adaptive per-client rank selection.

Koo et al., "Towards Robust and Efficient Federated Low-Rank Adaptation with Heterogeneous
Clients" (LoRA-A2), ACL 2025, sec. 4:

* Every client holds the global A and B of rank r_G. On odd rounds A is frozen and B trained,
  on even rounds the reverse (``freeze_a_on="odd"``; ``"even"`` swaps), so one factor moves
  per round and averaging it is exact: ``sum_k p_k dB_k A = (sum_k p_k dB_k) A``.
  ``alternating_freeze=False`` (an ablation, not the paper's method) trains both factors every
  round and averages each slot's A row and B column separately, a product of averages like
  FedIT's; slot importance is then the change of the slot's whole outer product,
  ``||B'[:, i] A'[i, :] - B[:, i] A[i, :]||_F``, which reduces to the forms below when one
  factor is frozen.
* A client with budget r_k (``sum`` of its per-module ranks, each capped at r_G) ranks every
  slot i of every module by its importance ``||dB[:, i] A[i, :]||_F`` (or
  ``||B[:, i] dA[i, :]||_F`` when A is trained), keeps its top slots across all modules
  (`select_slots`) and uploads only those, with their indices in ``extras["slots"]``.
  ``selection="per_module"`` (an ablation, not the paper's method) keeps instead the top
  ``min(r_k[m], r_G)`` slots of each module m, so every module gets its share of the budget
  (as FedIT's rank-r_k adapter has), and the server checks each module's count.
* ``masked_training=True`` (default, the paper's eq. 3): the client selects its slots *before*
  local training, from the first-order change of its first batch (dB = -grad, `select_slots`
  on the gradient), and trains only those slots; the others stay bit-identical.
  ``masked_training=False`` trains all r_G slots and masks only the upload (fedlora's earlier
  behaviour): the selection then sees the whole local change, but the uploaded slots were
  trained jointly with slots the server never receives.
* The server aggregates the masked updates with data-size weights over all the round's
  clients, unselected slots contributing zero:
  ``B[:, i] += sum_k p_k m_{k,i} (B_k[:, i] - B[:, i])``; with ``renormalize=True`` each slot's
  weights are renormalised over the clients that uploaded it.

Server factors are kept as (A, G) with G = scale * B, so each client gets its own LoRA scale
from its spec (``alpha_k / r_G``, or ``alpha_k / sqrt(r_G)`` with rsLoRA): B_k = G / scale_k,
and its trained B_k enters the average as scale_k * B_k. The factor a client was told to keep
frozen must come back unchanged, and only a client configured this run (whose budget the
server knows) may upload.
"""

from __future__ import annotations

import math
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
    Trainable,
    init_lora_A,
)
from fedlora.strategies import register

F64 = torch.float64
Budget = int | Mapping[str, int]  # slots over all modules, or per module


@register
class LoRAA2(Strategy):
    """Global A/B of rank r_G; alternating freeze; masked, slot-selected uploads."""

    name = "lora_a2"
    dp_released = "trained"

    def __init__(
        self,
        *,
        global_rank: int = 8,
        freeze_a_on: str = "odd",
        renormalize: bool = False,
        masked_training: bool = True,
        alternating_freeze: bool = True,
        selection: str = "global",
        **options,
    ) -> None:
        super().__init__(**options)
        if not self.shapes:
            raise FedLoraError("lora_a2: needs the option shapes={module: (d_out, d_in)}")
        if global_rank < 1:
            raise FedLoraError(f"lora_a2: global_rank must be >= 1, got {global_rank}")
        if freeze_a_on not in ("odd", "even"):
            raise FedLoraError(f"lora_a2: freeze_a_on must be 'odd' or 'even', got {freeze_a_on!r}")
        if selection not in ("global", "per_module"):
            raise FedLoraError(
                f"lora_a2: selection must be 'global' or 'per_module', got {selection!r}"
            )
        self.global_rank = global_rank
        self.freeze_a_on = freeze_a_on
        self.renormalize = renormalize
        self.masked_training = bool(masked_training)
        self.alternating_freeze = bool(alternating_freeze)
        self.selection = selection
        self.A = {
            m: init_lora_A(self.seed, m, global_rank, d_in, dtype=F64)
            for m, (_, d_in) in self.shapes.items()
        }
        self.G = {  # scale * B: effective, so clients with different alphas combine
            m: torch.zeros(d_out, global_rank, dtype=F64) for m, (d_out, _) in self.shapes.items()
        }
        self.budgets: dict[str, Budget] = {}
        self.scales: dict[str, dict[str, float]] = {}  # client -> module -> its LoRA scale

    @classmethod
    def option_problems(cls, options: Mapping[str, Any], privacy_mode: str = "none") -> list[str]:
        problems = super().option_problems(options, privacy_mode)
        if privacy_mode == "local" and options.get("masked_training", True):
            problems.append(
                "strategy.options.masked_training: lora_a2 picks the slots it trains from a "
                "noise-free gradient on the client's data, which DP-SGD does not protect; set "
                "it to false with privacy.mode = 'local' (slots are then picked from the "
                "DP-trained update)"
            )
        if privacy_mode == "central" and options.get("renormalize"):
            problems.append(
                "strategy.options.renormalize: lora_a2's per-slot renormalisation is a "
                "data-dependent denominator; set it to false with privacy.mode = 'central'"
            )
        return problems

    def trainable(self, server_round: int) -> Trainable:
        if not self.alternating_freeze:
            return frozenset({"A", "B"})
        odd = server_round % 2 == 1
        return frozenset({"B"}) if odd == (self.freeze_a_on == "odd") else frozenset({"A"})

    def budget(self, client: ClientSpec) -> Budget:
        """The rank slots the client may upload, each module's rank capped at r_G: their total
        over all modules (``selection="global"``), or module -> count (``"per_module"``)."""
        unknown = set(client.ranks) - set(self.shapes)
        if unknown:
            raise FedLoraError(
                f"lora_a2: client {client.client_id}: unknown modules {sorted(unknown)[:3]}"
            )
        per = {m: min(r, self.global_rank) for m, r in client.ranks.items()}
        return per if self.selection == "per_module" else sum(per.values())

    def client_scale(self, client: ClientSpec, module: str) -> float:
        """The client's LoRA scale on the rank-r_G adapter: its alpha over r_G (or sqrt)."""
        r = self.global_rank
        return client.alpha_of(module) / (math.sqrt(r) if client.rslora else r)

    def dp_scale(self, client: ClientSpec, module: str) -> float:
        return self.client_scale(client, module)

    def configure(self, client: ClientSpec, server_round: int) -> Payload:
        self.budgets[client.client_id] = budget = self.budget(client)
        scales = {m: self.client_scale(client, m) for m in self.shapes}
        self.scales[client.client_id] = scales
        adapter = {
            m: LoraFactors(self.A[m].float(), (self.G[m] / scales[m]).float(), scales[m])
            for m in self.shapes
        }
        extras = {"budget": budget, "masked_training": self.masked_training}
        payload = Payload(None, adapter, self.trainable(server_round), self.seed, extras)
        return self.with_dense(payload)

    def check_update(self, server_round: int, update: ClientUpdate) -> None:
        super().check_update(server_round, update)
        check_slots(update, self.global_rank, self.budgets.get(update.client_id), server_round)
        self.check_frozen(update, self.trainable(server_round), server_round)

    def aggregate(self, server_round: int, updates: Iterable[ClientUpdate]) -> None:
        updates = self.check_updates(server_round, updates, same_modules=False)
        trained = sorted(self.trainable(server_round))
        self.aggregate_dense(server_round, updates)
        weights = self.weights(updates)
        if self.privacy is not None:  # clip each client's masked factor change to clip_norm
            weights = [w * self._dp_clip(u, trained) for u, w in zip(updates, weights)]
        for factor in trained:  # both (no alternating freeze): each averaged on its own
            for module in self.shapes:
                self._aggregate_factor(server_round, updates, weights, module, factor)

    def _aggregate_factor(
        self,
        server_round: int,
        updates: list[ClientUpdate],
        weights: list[float],
        module: str,
        factor: str,
    ) -> None:
        """Add the clients' weighted, masked changes of `factor` ("A" or "B") of `module`."""
        old = self.G[module] if factor == "B" else self.A[module].T  # slots as columns
        delta = torch.zeros_like(old)
        mass = torch.zeros(self.global_rank, dtype=F64)
        for u, w in zip(updates, weights):
            if module not in u.adapter:
                continue
            idx = u.extras["slots"][module]
            f = u.adapter[module]
            new = f.scaled_B() if factor == "B" else f.A.to(F64).T
            delta[:, idx] += w * (new - old[:, idx])
            mass[idx] += w
        if self.renormalize:
            delta /= torch.where(mass > 0, mass, torch.ones_like(mass))
        if self.privacy is not None and self.privacy.noise_multiplier > 0:
            # clipping bounds B's change in the clients' units; G = scale * B, so the
            # noise scales with the largest scale any client can have (1 for A): the
            # configuration's, not the round's (which would depend on who was sampled)
            unit = self.privacy.scales.get(module, 1.0) if factor == "B" else 1.0
            noise = self.privacy.noise(delta.shape, server_round, f"{factor}/{module}")
            delta += unit * noise
        if factor == "B":
            self.G[module] = old + delta
        else:
            self.A[module] = (old + delta).T.contiguous()

    def check_frozen(self, u: ClientUpdate, trained: Trainable, server_round: int) -> None:
        """Raise unless the upload kept the factor it was told to freeze (if any), at the scale
        it was configured with (a changed frozen factor would make the exact average wrong)."""
        scales = self.scales[u.client_id]
        for module, f in u.adapter.items():
            who = f"lora_a2: round {server_round}, client {u.client_id}, module {module}"
            if not math.isclose(f.scale, scales[module], rel_tol=1e-9):
                raise FedLoraError(
                    f"{who}: scale {f.scale}, but it was configured with {scales[module]}"
                )
            if len(trained) > 1:
                continue  # nothing frozen
            idx = torch.as_tensor(u.extras["slots"][module])
            if "B" in trained:
                sent, back, name = self.A[module][idx].float(), f.A, "A"
            else:
                sent, back, name = (self.G[module][:, idx] / scales[module]).float(), f.B, "B"
            if not torch.allclose(back, sent, rtol=1e-5, atol=1e-7):
                raise FedLoraError(f"{who}: the frozen factor {name} came back changed")

    def global_delta(self) -> Adapter:
        return {m: LoraFactors(self.A[m].clone(), self.G[m].clone(), 1.0) for m in self.shapes}

    def _dp_clip(self, u: ClientUpdate, trained: list[str]) -> float:
        """The clip multiplier of `u`'s change of the trained factor(s) on its uploaded slots."""
        sq = 0.0
        for module, f in u.adapter.items():
            idx = torch.as_tensor(u.extras["slots"][module])
            for factor in trained:
                if factor == "B":  # B in the client's own units, as it trained it
                    old, new = self.G[module][:, idx] / f.scale, f.B.to(F64)
                else:
                    old, new = self.A[module][idx], f.A.to(F64)
                sq += float(((new - old) ** 2).sum())
        return self.privacy.clip(sq**0.5)


def check_slots(
    u: ClientUpdate, global_rank: int, budget: Budget | None, server_round: int
) -> None:
    """An upload's slot indices: present per module, in range, unique, matching its factors,
    and within the client's budget (in total, or per module)."""
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
        if isinstance(budget, Mapping) and idx.numel() > budget.get(module, 0):
            raise FedLoraError(
                f"{who}, module {module}: uploaded {idx.numel()} slots, over its budget of "
                f"{budget.get(module, 0)}"
            )
        total += idx.numel()
    if budget is None:
        raise FedLoraError(f"{who}: was never configured, so it has no budget to upload against")
    if not isinstance(budget, Mapping) and total > budget:
        raise FedLoraError(f"{who}: uploaded {total} slots, over its budget of {budget}")


def slot_importance(before: LoraFactors, after: LoraFactors, trained: str) -> Tensor:
    """Per-slot importance ``||dB[:, i] A[i, :]||_F`` (B trained) or ``||B[:, i] dA[i, :]||_F``
    (A trained); for an outer product this is the product of the two vectors' norms. Both
    trained (``"AB"``): the norm of the slot's change ``dB A' + B dA`` (float64), from
    ``||u v^T + x y^T||^2 = |u|^2 |v|^2 + |x|^2 |y|^2 + 2 (u . x)(v . y)``."""
    if trained == "B":
        return (after.B - before.B).norm(dim=0) * after.A.norm(dim=1) * abs(after.scale)
    if trained == "A":
        return after.B.norm(dim=0) * (after.A - before.A).norm(dim=1) * abs(after.scale)
    dB, A1 = (after.B - before.B).to(F64), after.A.to(F64)
    B0, dA = before.B.to(F64), (after.A - before.A).to(F64)
    sq = (dB**2).sum(0) * (A1**2).sum(1) + (B0**2).sum(0) * (dA**2).sum(1)
    sq += 2 * (dB * B0).sum(0) * (A1 * dA).sum(1)
    return sq.clamp(min=0).sqrt() * abs(after.scale)


def select_slots(
    before: Adapter, after: Adapter, trainable: Trainable, budget: Budget
) -> dict[str, Tensor]:
    """LoRA-A2's client-side selection: the `budget` most important slots over all modules,
    or, with a per-module budget (module -> count), each module's most important slots.

    Returns module -> sorted slot indices (modules with no selected slot are left out). Ties
    are broken by module order then slot index, so the choice is deterministic.
    """
    trained = "".join(sorted(trainable))  # "A", "B" or "AB"
    scores = {m: slot_importance(before[m], after[m], trained).to(F64) for m in sorted(after)}
    if isinstance(budget, Mapping):
        groups = [({m: s}, int(budget.get(m, 0))) for m, s in scores.items()]
    else:
        groups = [(scores, int(budget))]
    chosen: dict[str, list[int]] = {}
    for group, k in groups:
        owners = [(m, i) for m, s in group.items() for i in range(s.numel())]
        if not owners:
            continue
        flat = torch.cat(list(group.values()))
        for j in sorted(range(flat.numel()), key=lambda j: (-float(flat[j]), j))[: max(k, 0)]:
            chosen.setdefault(owners[j][0], []).append(owners[j][1])
    return {m: torch.tensor(sorted(v), dtype=torch.long) for m, v in chosen.items()}


def masked_upload(after: Adapter, slots: Mapping[str, Tensor]) -> Adapter:
    """The factors restricted to the selected slots: what a LoRA-A2 client sends."""
    return {
        m: LoraFactors(after[m].A[idx].clone(), after[m].B[:, idx].clone(), after[m].scale)
        for m, idx in slots.items()
    }
