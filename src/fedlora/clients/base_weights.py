"""The base weights of the LoRA target modules, with a merge applied on top.

Some strategies (FLoRA, FedEx-LoRA) send each client a ``merge``: a low-rank delta to add to
the base weights before training; evaluation adds the global delta the same way. `BaseWeights`
makes ``W_original + merge`` the effective weight of every target module, exactly, in one of
two ways chosen from the weights' storage:

* ``"fold"`` (float32 weights): ``W += scale * B @ A`` computed in float64, rounded once to
  float32. The original weight of a module is copied to the CPU the first time a merge touches
  it and copied back to restore it, so the copy never doubles accelerator memory, and a run
  without merges keeps no copy at all.
* ``"branch"`` (bfloat16 / float16 weights, or a quantized base): folding would round the small
  merge away against the large weight (bf16 keeps 8 bits of mantissa) or need a lossy
  requantization, so the merge runs as a frozen low-rank side branch instead: a forward hook
  adds ``x @ A.T @ (scale B).T`` to the module's output. Exact in the sense that the base
  weights are never touched (no copy, no rounding of W); it costs ``2 r (d_in + d_out)`` FLOPs
  per token and ``r (d_in + d_out)`` float32 numbers of device memory per merged module.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fedlora.core.contract import Adapter, LoraFactors

MODES = ("fold", "branch")


def is_quantized(module: nn.Module) -> bool:
    """Whether a linear module's weight is stored quantized (bitsandbytes 4-bit / 8-bit)."""
    return type(module.weight).__name__ in ("Params4bit", "Int8Params")


def default_mode(modules: Mapping[str, nn.Module]) -> str:
    """``"fold"`` when every target weight is a plain float32 tensor, else ``"branch"``."""
    for lin in modules.values():
        if is_quantized(lin) or lin.weight.dtype != torch.float32:
            return "branch"
    return "fold"


class BaseWeights:
    """``W_original + merge`` for the target `modules` (module path -> nn.Linear); see the
    module docstring for the two modes."""

    def __init__(self, modules: Mapping[str, nn.Linear], mode: str | None = None) -> None:
        self.modules = dict(modules)
        self.mode = mode or default_mode(self.modules)
        if self.mode not in MODES:
            raise ValueError(f"BaseWeights: mode must be one of {MODES}, got {self.mode!r}")
        self._orig: dict[str, torch.Tensor] = {}  # fold: CPU copies of touched modules
        self._dirty: set[str] = set()  # fold: modules whose weight differs from the original
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}  # branch
        self.merge: Adapter = {}  # the merge applied now

    def apply(self, merge: Adapter) -> None:
        """Make ``W_original + merge`` the effective weights (the previous merge is removed)."""
        self.restore()
        if self.mode == "fold":
            self._fold(merge)
        else:
            self._branch(merge)
        self.merge = dict(merge)

    def restore(self) -> None:
        """Back to the original weights."""
        with torch.no_grad():
            for m in self._dirty:
                w = self.modules[m].weight
                w.copy_(self._orig[m].to(w.device, non_blocking=True))
        self._dirty.clear()
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self.merge = {}

    def original(self, module: str) -> torch.Tensor:
        """The original weight of a float32 module (a CPU copy when a merge touched it)."""
        if module in self._orig:
            return self._orig[module]
        return self.modules[module].weight.detach().cpu()

    def _fold(self, merge: Adapter) -> None:
        with torch.no_grad():
            for m, f in merge.items():
                if f.rank == 0:
                    continue
                w = self.modules[m].weight
                if m not in self._orig:
                    self._orig[m] = w.detach().to("cpu", copy=True)
                delta = f.delta(torch.float64).to(w.device)
                w.copy_((w.to(torch.float64) + delta).to(w.dtype))
                self._dirty.add(m)

    def _branch(self, merge: Adapter) -> None:
        for m, f in merge.items():
            if f.rank == 0:
                continue
            lin = self.modules[m]
            device = next(lin.parameters()).device
            self._hooks[m] = lin.register_forward_hook(_side_branch(f, device))


def _side_branch(f: LoraFactors, device: torch.device):
    """A forward hook adding ``x @ A.T @ (scale B).T`` (factors held in float32 on `device`;
    under autocast the two small matmuls run in the autocast dtype)."""
    a = f.A.to(device=device, dtype=torch.float32)
    b = f.scaled_B(torch.float64).to(device=device, dtype=torch.float32)

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        extra = F.linear(F.linear(x.to(a.dtype), a), b)
        return output + extra.to(output.dtype)

    return hook
