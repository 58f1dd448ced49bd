"""A synthetic, pure-torch LoRA task for smoke-testing a Flower deployment (``model = "toy"``).

Not a language model: each module is a fixed random base weight W0, each client partition p
has a target ``T_p = W0 + D + E_p`` (a shared low-rank shift plus a client-specific one), and
"training" is a few steps of full-batch gradient descent on ``||W0 + merge + s B A - T_p||^2``
over the trainable factors. It follows the whole client side of the contract (merge, adapter or
seeded init, trainable, LoRA-A2 slot selection, HetLoRA self-pruning), is deterministic, and
runs in milliseconds, so the same rounds can be replayed in-process for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.contract import (
    Adapter,
    ClientSpec,
    ClientUpdate,
    LoraFactors,
    Payload,
    init_lora,
    module_seed,
)
from fedlora.strategies.hetlora import pruned_rank, self_pruning_penalty
from fedlora.strategies.lora_a2 import masked_upload, select_slots

F64 = torch.float64


def toy_shapes(n_layers: int = 2, d_model: int = 16, d_ff: int = 24) -> dict[str, tuple[int, int]]:
    """Module names and (d_out, d_in) shaped like a tiny decoder's attention/MLP projections."""
    shapes = {}
    for i in range(n_layers):
        shapes[f"model.layers.{i}.self_attn.q_proj"] = (d_model, d_model)
        shapes[f"model.layers.{i}.mlp.up_proj"] = (d_ff, d_model)
    return shapes


def _randn(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(module_seed(seed, name))
    return torch.randn(*shape, generator=g, dtype=F64)


@dataclass
class ToyTask:
    shapes: dict[str, tuple[int, int]]
    seed: int = 0
    steps: int = 5
    lr: float = 0.5

    def base(self, module: str) -> torch.Tensor:
        return _randn(self.seed, "base/" + module, self.shapes[module]) / 4

    def target(self, module: str, partition: int) -> torch.Tensor:
        d_out, d_in = self.shapes[module]
        shared = _randn(self.seed, "U/" + module, (d_out, 2)) @ _randn(
            self.seed, "V/" + module, (2, d_in)
        )
        own = _randn(self.seed, f"E{partition}/" + module, (d_out, 1)) @ _randn(
            self.seed, f"F{partition}/" + module, (1, d_in)
        )
        return self.base(module) + 0.3 * shared + 0.1 * own

    def num_examples(self, partition: int) -> int:
        return 8 + 4 * partition

    def _start(self, merge: Adapter | None, module: str) -> torch.Tensor:
        W = self.base(module)
        if merge and module in merge and merge[module].rank:
            W = W + merge[module].delta(F64)
        return W

    def train(self, spec: ClientSpec, payload: Payload, partition: int) -> ClientUpdate:
        """Local training on partition `partition` following `payload`; the client's update."""
        if payload.adapter is not None:
            start = payload.adapter
        else:
            start = {
                m: init_lora(payload.seed, m, r, self.shapes[m], spec.scale(m))
                for m, r in spec.ranks.items()
            }
        het = payload.extras.get("hetlora")
        after: Adapter = {}
        tails: dict[str, float] = {}
        loss_total = 0.0
        for module, f0 in start.items():
            W = self._start(payload.merge, module)
            T = self.target(module, partition)
            A = f0.A.to(F64).clone().requires_grad_("A" in payload.trainable)
            B = f0.B.to(F64).clone().requires_grad_("B" in payload.trainable)
            params = [p for p in (A, B) if p.requires_grad]
            for _ in range(self.steps):
                loss = (W + f0.scale * B @ A - T).square().mean()
                if het and het.get("lambda", 0) > 0:
                    loss = loss + het["lambda"] * self_pruning_penalty(A, B, het["gamma"], f0.scale)
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():  # step 1/L per factor (L: its gradient's Lipschitz const)
                    for p, g in zip(params, grads):
                        other = B if p is A else A
                        L = 2 * f0.scale**2 * max(float(other.norm()) ** 2, 1e-3) / W.numel()
                        p -= self.lr * g / L
            with torch.no_grad():
                loss_total += float((W + f0.scale * B @ A - T).square().mean())
                A, B = A.detach().to(f0.A.dtype), B.detach().to(f0.B.dtype)
                if het and het.get("lambda", 0) > 0:
                    tail = float(self_pruning_penalty(A.to(F64), B.to(F64), het["gamma"], f0.scale))
                    tails[module] = tail
                    prev = het.get("prev_tail_norms", {}).get(module)
                    k = pruned_rank(f0.rank, het["gamma"], tail, prev)
                    A, B = A[:k].clone(), B[:, :k].clone()
            after[module] = LoraFactors(A, B, f0.scale)
        extras: dict = {"train_loss": loss_total / max(1, len(start))}
        if "budget" in payload.extras:
            slots = select_slots(start, after, payload.trainable, int(payload.extras["budget"]))
            after = masked_upload(after, slots)
            extras["slots"] = slots
        if tails:
            extras["hetlora_tail_norms"] = tails
        n = spec.num_examples or self.num_examples(partition)
        return ClientUpdate(spec.client_id, after, n, extras)

    def evaluate(self, delta: Adapter | None, partition: int) -> float:
        """Mean squared error of ``W0 + delta`` against the partition's targets."""
        errs = [
            float((self._start(delta, m) - self.target(m, partition)).square().mean())
            for m in self.shapes
        ]
        return sum(errs) / len(errs)
