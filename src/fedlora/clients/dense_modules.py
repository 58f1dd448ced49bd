"""Modules a `fedlora.clients.host.LoraHost` trains in full beside LoRA (peft's
``modules_to_save``): a classifier's head, typically.

Their parameters travel as ``dense`` tensors, parameter name (``"classifier.weight"``) ->
tensor, in `fedlora.core.contract.Payload` and `ClientUpdate`; every strategy averages them by
weighted FedAvg. Clients are stateless: a name a payload lacks gets the model's original value
(kept here, on CPU), so the first round starts from the seeded initial head everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fedlora.core.contract import FedLoraError


class DenseModules:
    """The fully trained parameters of `modules` (full module paths or suffixes) of `model`.

    A module may not also hold a LoRA target (`lora_targets`): it is trained one way or the
    other.
    """

    def __init__(self, model: nn.Module, modules: Iterable[str], lora_targets: Iterable[str]):
        self.params = _resolve(model, list(modules), set(lora_targets))
        self.original = {k: p.detach().to("cpu", copy=True) for k, p in self.params.items()}

    def modules(self) -> list[str]:
        """The module paths (peft's ``modules_to_save`` for a saved adapter)."""
        return sorted({k.rsplit(".", 1)[0] for k in self.params})

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(p.shape) for k, p in self.params.items()}

    def parameters(self) -> list[nn.Parameter]:
        """The parameters in name order (what the optimizer trains)."""
        return [self.params[k] for k in sorted(self.params)]

    def train(self) -> None:
        """Make them trainable (after peft, which freezes everything but LoRA on each new
        adapter)."""
        for p in self.params.values():
            p.requires_grad_(True)
            p.grad = None

    def read(self) -> dict[str, torch.Tensor]:
        """CPU float32 copies of the current values."""
        return {
            k: p.detach().to("cpu", torch.float32, copy=True)
            for k, p in sorted(self.params.items())
        }

    def load(self, values: dict[str, torch.Tensor] | None, who: str) -> None:
        """Copy `values` in; a name it lacks gets the original value. Errors name `who`."""
        values = dict(values or {})
        unknown = set(values) - set(self.params)
        if unknown:
            raise FedLoraError(
                f"{who}: dense tensor {sorted(unknown)[0]!r} is not a parameter of this host's "
                f"modules_to_save ({self.modules()})"
            )
        with torch.no_grad():
            for k, p in self.params.items():
                v = values.get(k, self.original[k])
                if tuple(v.shape) != tuple(p.shape):
                    raise FedLoraError(
                        f"{who}: dense tensor {k} has shape {tuple(v.shape)}, the model's is "
                        f"{tuple(p.shape)}"
                    )
                if not torch.isfinite(v).all():
                    raise FedLoraError(f"{who}: dense tensor {k} contains NaN or Inf")
                p.copy_(v.to(p.device, p.dtype))

    def completed(self, values: dict[str, torch.Tensor] | None, who: str) -> dict:
        """`values` checked and completed with the original ones, CPU float32 (for saving)."""
        current = self.read()
        try:
            self.load(values, who)
            return self.read()
        finally:
            self.load(current, who)


def _resolve(model: nn.Module, modules: list[str], lora_targets: set[str]) -> dict:
    named = dict(model.named_modules())
    out: dict[str, nn.Parameter] = {}
    for t in modules:
        hits = [n for n in named if n == t or n.endswith("." + t)] if t else []
        if not hits:
            raise FedLoraError(f"LoraHost: modules_to_save entry {t!r} is not a module")
        for n in hits:
            clash = [m for m in lora_targets if m == n or m.startswith(n + ".")]
            if clash:
                raise FedLoraError(
                    f"LoraHost: module {n!r} is both in modules_to_save and a LoRA target "
                    f"({clash[0]}); train it one way"
                )
            for pname, p in named[n].named_parameters():
                out[f"{n}.{pname}"] = p
    return out
