"""peft adapters on one base model, one per rank configuration, one active at a time.

Clients differ in their LoRA ranks per module. Creating a peft adapter for a rank configuration
costs a pass over the model, so `AdapterCache` keeps the most recently used ``max_adapters``
configurations (LRU) and reuses one for every client with the same ranks: activating a client
is copying its factors into the cached adapter's parameters, not copying the model. LoRA
factors are kept in float32 on the base model's device (the master weights of mixed-precision
training), whatever the base weights' dtype.
"""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fedlora.core.contract import Adapter, FedLoraError, LoraFactors


class AdapterCache:
    """The peft adapters of `model` (see the module docstring)."""

    def __init__(self, model: nn.Module, *, lora_dropout: float, max_adapters: int) -> None:
        self.model = model
        self.lora_dropout = float(lora_dropout)
        self.max_adapters = int(max_adapters)
        self.peft: Any = None  # the PeftModel, created with the first adapter
        self._names: OrderedDict[tuple, str] = OrderedDict()  # rank config -> adapter name
        self._counter = 0
        self._layers: dict[str, Any] = {}  # module -> peft LoraLayer
        self.active: str | None = None
        self.ranks: dict[str, int] = {}  # ranks of the active adapter

    def __len__(self) -> int:
        return len(self._names)

    def activate(self, ranks: dict[str, int]) -> str:
        """Make an adapter with `ranks` (module -> rank) the active one; returns its name."""
        name = self._adapter_for(ranks)
        self.peft.set_adapter(name)
        self.active, self.ranks = name, dict(ranks)
        return name

    def load(self, factors: Adapter, trainable: Iterable[str]) -> None:
        """Copy `factors` into the active adapter, set its scales, and let only the factors in
        `trainable` (``"A"``, ``"B"``) require grad."""
        trainable = set(trainable)
        with torch.no_grad():
            for m, f in factors.items():
                layer = self._layers[m]
                pa, pb = layer.lora_A[self.active].weight, layer.lora_B[self.active].weight
                pa.copy_(f.A)
                pb.copy_(f.B)
                layer.scaling[self.active] = float(f.scale)
                pa.requires_grad_("A" in trainable)
                pb.requires_grad_("B" in trainable)
                pa.grad = None
                pb.grad = None

    def weights(self) -> dict[str, tuple[nn.Parameter, nn.Parameter, float]]:
        """module -> (A param, B param, scale) of the active adapter (live, differentiable)."""
        out = {}
        for m in self.ranks:
            layer = self._layers[m]
            out[m] = (
                layer.lora_A[self.active].weight,
                layer.lora_B[self.active].weight,
                float(layer.scaling[self.active]),
            )
        return out

    def read(self) -> Adapter:
        """The active adapter's factors as CPU float32 copies, with their scales."""
        return {m: LoraFactors(_cpu32(a), _cpu32(b), s) for m, (a, b, s) in self.weights().items()}

    def disabled(self):
        """Context in which every LoRA layer is bypassed (the base model alone)."""
        return self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext()

    def _adapter_for(self, ranks: dict[str, int]) -> str:
        key = tuple(sorted(ranks.items()))
        name = self._names.get(key)
        if name is not None:
            self._names.move_to_end(key)
            return name
        self._counter += 1
        name = f"fedlora_{self._counter}"
        self._create(name, ranks)
        self._names[key] = name
        while len(self._names) > self.max_adapters:
            old_key, old = next(iter(self._names.items()))
            if old == name:  # pragma: no cover - max_adapters >= 1
                break
            del self._names[old_key]
            if self.active == old:
                self.active = None
            self.peft.delete_adapter(old)
        return name

    def _create(self, name: str, ranks: dict[str, int]) -> None:
        from peft import LoraConfig, get_peft_model

        r0 = next(iter(ranks.values()))
        config = LoraConfig(
            r=r0,
            lora_alpha=float(r0),  # the scale is set exactly per client (see `load`)
            target_modules=list(ranks),
            rank_pattern={re.escape(m): r for m, r in ranks.items()},
            alpha_pattern={re.escape(m): float(r) for m, r in ranks.items()},
            lora_dropout=self.lora_dropout,
            bias="none",
        )
        if self.peft is None:
            self.peft = get_peft_model(self.model, config, adapter_name=name)
        else:
            self.peft.add_adapter(name, config)
        for m in ranks:
            layer = self.model.get_submodule(m)
            self._layers[m] = layer
            for factor in (layer.lora_A[name], layer.lora_B[name]):
                factor.to(torch.float32)  # master weights, whatever the base dtype
            got = layer.lora_A[name].weight.shape[0]
            if got != ranks[m]:  # pragma: no cover - peft pattern matching guard
                raise FedLoraError(f"LoraHost: peft made rank {got} for {m}, wanted {ranks[m]}")


def _cpu32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32, copy=True)
