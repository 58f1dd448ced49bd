"""`LoraHost`: one loaded base model hosting every client's heterogeneous LoRA adapter in turn.

``prepare(spec, payload)`` validates the payload against the model, applies its ``merge`` to the
base weights (`fedlora.clients.base_weights.BaseWeights`), activates a peft adapter with the
payload's per-module ranks (`fedlora.clients.adapter_cache.AdapterCache`: one cached adapter
per rank configuration, no model copy per client), loads the factors and freezes per
``payload.trainable``. ``use_global(delta, dense)`` evaluates the original base plus a delta;
``save_adapter`` / ``merge_and_save`` export a delta for plain peft / transformers. Modules in
``modules_to_save`` (a classifier's head) are trained in full and exchanged as ``dense``
tensors (`fedlora.clients.dense_modules`).

The host computes on the device its model lives on (`fedlora.clients.models.load_model` puts it
there); factors enter and leave (`read_adapter`) as CPU float32, so strategies never see a device.
Adapter keys are base-model module paths (``model.layers.0.self_attn.q_proj``), never peft's
``base_model.model.`` prefixed names.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedlora.clients.adapter_cache import AdapterCache
from fedlora.clients.base_weights import BaseWeights, is_quantized
from fedlora.clients.dense_modules import DenseModules
from fedlora.clients.device import float32_outputs
from fedlora.core.contract import (
    Adapter,
    ClientSpec,
    FedLoraError,
    LoraFactors,
    Payload,
    check_factors,
    init_lora,
)


class LoraHost:
    """One base model hosting every client's LoRA adapter in turn (see the module docstring).

    ``target_modules``: full module paths, or suffixes (``"q_proj"``) matched against them.
    ``alpha`` / ``rslora``: defaults for `save_adapter` configs; a client's scale always comes
    from its spec (``spec.scale(module)``) or from the payload factors' ``scale``.
    ``max_adapters``: how many peft adapters (rank configurations) stay cached.
    ``merge_mode``: how merges reach the base weights, ``"fold"`` or ``"branch"`` (default: fold
    for float32 weights, branch otherwise; see `fedlora.clients.base_weights`).
    ``modules_to_save``: module paths (or suffixes) trained in full and federated as dense
    tensors; they must not overlap the LoRA targets.
    """

    def __init__(
        self,
        model: nn.Module,
        target_modules: Iterable[str],
        *,
        lora_dropout: float = 0.0,
        rslora: bool = False,
        alpha: float = 16.0,
        max_adapters: int = 8,
        merge_mode: str | None = None,
        modules_to_save: Iterable[str] = (),
    ) -> None:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            raise FedLoraError("LoraHost: pass the base model, not a PeftModel")
        if not 0.0 <= lora_dropout < 1.0:
            raise FedLoraError(f"LoraHost: lora_dropout must be in [0, 1), got {lora_dropout}")
        if max_adapters < 1:
            raise FedLoraError(f"LoraHost: max_adapters must be >= 1, got {max_adapters}")
        self.model = model
        self.rslora = bool(rslora)
        self.alpha = float(alpha)
        self._base: dict[str, nn.Linear] = self._resolve(model, list(target_modules))
        for p in model.parameters():
            p.requires_grad_(False)
        # before any merge hook; the handles let a benchmark compare against plain bf16 sums
        self.output_hooks = float32_outputs(self._base.values())
        self.base = BaseWeights(self._base, merge_mode)
        self.adapters = AdapterCache(model, lora_dropout=lora_dropout, max_adapters=max_adapters)
        self.dense = DenseModules(model, modules_to_save, self._base)
        self._compiled: nn.Module | None = None  # torch.compile(model), made on first use

    @staticmethod
    def _resolve(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
        if not targets:
            raise FedLoraError("LoraHost: target_modules is empty")
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        out: dict[str, nn.Linear] = {}
        for t in targets:
            if t in linears:
                out[t] = linears[t]
                continue
            hits = [n for n in linears if n.endswith("." + t)]
            if not hits:
                raise FedLoraError(
                    f"LoraHost: target module {t!r} is not an nn.Linear of the model"
                )
            for n in hits:
                out[n] = linears[n]
        return out

    # -- introspection -------------------------------------------------------------------

    @property
    def peft(self) -> Any:
        """The PeftModel wrapping the base model (None before the first `prepare`)."""
        return self.adapters.peft

    @property
    def device(self) -> torch.device:
        return next(iter(self._base.values())).weight.device

    def module_names(self) -> list[str]:
        return list(self._base)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """module -> (d_out, d_in) of its weight."""
        return {m: (lin.out_features, lin.in_features) for m, lin in self._base.items()}

    def base_norm(self) -> float:
        """The Frobenius norm of the target modules' original base weights, all together
        (dequantized where stored quantized): the scale the server's first-round lone bound
        follows (`fedlora.core.robust.first_round_norm`)."""
        total = 0.0
        for m, lin in self._base.items():
            if is_quantized(lin):
                import bitsandbytes.functional as bnbf

                w = lin.weight
                state = getattr(w, "quant_state", None)
                if state is None:  # 8-bit: int8 rows and their absmax / 127
                    scb = getattr(w, "SCB", None)
                    scb = lin.state.SCB if scb is None else scb
                    w = w.data.float() * (scb.float()[:, None] / 127.0)
                else:
                    w = bnbf.dequantize_4bit(w.data, state)
            else:
                w = self.base.original(m)
            total += float(w.detach().double().pow(2).sum())
        return total**0.5

    @property
    def active_ranks(self) -> dict[str, int]:
        """Ranks of the adapter activated by the last `prepare`."""
        return dict(self.adapters.ranks)

    def trainable_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(A params, B params) of the active adapter that require grad, in module order."""
        a, b = [], []
        for pa, pb, _ in self.adapters.weights().values():
            if pa.requires_grad:
                a.append(pa)
            if pb.requires_grad:
                b.append(pb)
        return a, b

    def lora_weights(self) -> dict[str, tuple[nn.Parameter, nn.Parameter, float]]:
        """module -> (A param, B param, scale) of the active adapter (live, differentiable)."""
        return self.adapters.weights()

    def dense_parameters(self) -> list[nn.Parameter]:
        """The fully trained parameters (``modules_to_save``), trainable after `prepare`."""
        return self.dense.parameters()

    def dense_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape of the fully trained parameters."""
        return self.dense.shapes()

    def read_dense(self) -> dict[str, torch.Tensor]:
        """CPU float32 copies of the fully trained parameters' current values."""
        return self.dense.read()

    # -- validation --------------------------------------------------------------------------

    def _check_module(self, module: str, f: LoraFactors, who: str, what: str) -> None:
        if module not in self._base:
            raise FedLoraError(
                f"{who}: {what} module {module!r} is not a target module of this model "
                f"(targets: {list(self._base)[:3]} ...)"
            )
        check_factors(f, f"{who}, {what} module {module}")
        expected = self.shapes()[module]
        if f.shape != expected:
            raise FedLoraError(
                f"{who}, {what} module {module}: weight shape (d_out, d_in) = {f.shape}, "
                f"but the model's is {expected}"
            )

    def _client_factors(self, spec: ClientSpec, payload: Payload) -> dict[str, LoraFactors]:
        """The factors `spec` starts from: the payload's, else a fresh `init_lora` for the
        modules in its ranks; validates the payload (merge included) on the way."""
        who = f"client {spec.client_id}"
        for m, f in (payload.merge or {}).items():
            self._check_module(m, f, who, "merge")
        given = dict(payload.adapter or {})
        for m, f in given.items():
            if f is not None:
                self._check_module(m, f, who, "adapter")
        for m in spec.ranks:
            if m not in self._base:
                raise FedLoraError(
                    f"{who}: module {m!r} in its ranks is not a target module of this model"
                )
        if not set(payload.trainable) <= {"A", "B"}:
            raise FedLoraError(f"{who}: trainable must be a subset of {{'A', 'B'}}")
        shapes = self.shapes()
        factors: dict[str, LoraFactors] = {}
        for m in self._base:  # host module order, deterministic
            f = given.get(m)
            if f is not None:
                if f.rank == 0:
                    raise FedLoraError(f"{who}, adapter module {m}: rank 0 cannot be trained")
                factors[m] = f
            elif m in spec.ranks:
                factors[m] = init_lora(
                    payload.seed, m, spec.ranks[m], shapes[m], spec.scale(m), torch.float32
                )
        if not factors:
            raise FedLoraError(f"{who}: no module to train")
        return factors

    # -- prepare / read ----------------------------------------------------------------------

    def prepare(self, spec: ClientSpec, payload: Payload) -> nn.Module:
        """Set the host up for `spec`'s local training on `payload`; returns the model."""
        factors = self._client_factors(spec, payload)
        self.base.apply(dict(payload.merge or {}))
        self.adapters.activate({m: f.rank for m, f in factors.items()})
        self.adapters.load(factors, payload.trainable)
        self.dense.load(payload.dense, f"client {spec.client_id}")
        self.dense.train()
        return self.model

    def compiled(self) -> nn.Module:
        """`torch.compile` of the model, made once per host and reused by every client.

        The compiled module shares the model's parameters and adapters; dynamo recompiles when
        an input shape, the active adapter, a LoRA scale or the trainable set changes (each a
        fresh compilation), and falls back to eager beyond its cache size limit.
        """
        if self._compiled is None:
            self._compiled = torch.compile(self.model)
        return self._compiled

    def read_adapter(self) -> Adapter:
        """The active adapter's factors (CPU float32 copies) with their scales."""
        if self.adapters.active is None:
            raise FedLoraError("LoraHost.read_adapter: call prepare first")
        return self.adapters.read()

    # -- global model ------------------------------------------------------------------------

    def _check_delta(self, delta: Adapter, what: str) -> None:
        for m, f in delta.items():
            self._check_module(m, f, what, "delta")

    @contextlib.contextmanager
    def use_global(
        self, delta: Adapter | None, dense: dict[str, torch.Tensor] | None = None
    ) -> Iterator[nn.Module]:
        """Context: original base + `delta`, the global `dense` tensors (a name it lacks: the
        original value), LoRA disabled, eval mode.

        Restores the prepared client state (its merge, dense values, training mode) on exit.
        """
        delta = dict(delta or {})
        self._check_delta(delta, "global model")
        was_training = self.model.training
        client_merge = self.base.merge
        client_dense = self.dense.read()
        self.dense.load(dense, "global model")
        self.base.apply(delta)
        try:
            self.model.eval()
            with self.adapters.disabled():
                yield self.model
        finally:
            self.base.apply(client_merge)
            self.dense.load(client_dense, "global model")
            self.model.train(was_training)

    def save_adapter(
        self,
        delta: Adapter,
        out_dir: str | os.PathLike,
        alpha: float | None = None,
        dense: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write `delta` (factored, per-module ranks) as a peft adapter directory.

        Loadable with ``peft.PeftModel.from_pretrained(base_model, out_dir)``. With ``alpha``
        None each module's alpha equals its rank (rslora: sqrt(rank)), so peft's scale is 1 and
        the factors are stored unchanged; otherwise B is divided by peft's scale alpha/r.
        Rank-0 modules are left out. The ``modules_to_save`` parameters (`dense`, else their
        original values) are saved as peft saves ``modules_to_save``, so plain peft loads the
        trained head with the adapter.
        """
        from peft import LoraConfig
        from safetensors.torch import save_file

        self._check_delta(delta, "save_adapter")
        kept = {m: f for m, f in delta.items() if f.rank > 0}
        if not kept:
            raise FedLoraError("save_adapter: every module of the delta has rank 0")
        ranks = {m: f.rank for m, f in kept.items()}
        root = (lambda r: math.sqrt(r)) if self.rslora else (lambda r: float(r))
        alphas = {m: (root(r) if alpha is None else float(alpha)) for m, r in ranks.items()}
        tensors = {}
        for m, f in kept.items():
            peft_scale = alphas[m] / root(ranks[m])
            b = f.B.to(torch.float64) * (f.scale / peft_scale)
            tensors[f"base_model.model.{m}.lora_A.weight"] = f.A.to(torch.float32).contiguous()
            tensors[f"base_model.model.{m}.lora_B.weight"] = b.to(torch.float32).contiguous()
        for k, v in self.dense.completed(dense, "save_adapter").items():
            tensors[f"base_model.model.{k}"] = v.contiguous()
        r0 = next(iter(ranks.values()))
        config = LoraConfig(
            r=r0,
            lora_alpha=alphas[next(iter(ranks))],
            target_modules=list(ranks),
            rank_pattern={re.escape(m): r for m, r in ranks.items()},
            alpha_pattern={re.escape(m): a for m, a in alphas.items()},
            use_rslora=self.rslora,
            lora_dropout=0.0,
            bias="none",
            modules_to_save=self.dense.modules() or None,
            base_model_name_or_path=getattr(self.model, "name_or_path", None) or None,
        )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(out))
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        return out

    def merge_and_save(
        self,
        delta: Adapter,
        out_dir: str | os.PathLike,
        tokenizer: Any = None,
        dense: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the merged model (original base + `delta`, the `dense` tensors set) as a plain
        transformers model, in the base weights' dtype (a quantized base is refused: save the
        adapter instead)."""
        if any(is_quantized(lin) for lin in self._base.values()):
            raise FedLoraError(
                "model.save_merged: the base model is quantized (model.quantization); merge the "
                "saved adapter/ into the full-precision model instead"
            )
        out = Path(out_dir)
        with self.use_global(delta, dense) as model:
            state = {}
            for k, v in model.state_dict().items():
                if ".lora_" in k:
                    continue
                state[k.replace(".base_layer.", ".")] = v
            if self.base.mode == "branch":  # the delta runs beside the weights: fold it here
                for m, f in delta.items():
                    if f.rank > 0:
                        w = state[f"{m}.weight"]
                        folded = w.detach().cpu().to(torch.float64) + f.delta(torch.float64)
                        state[f"{m}.weight"] = folded.to(w.dtype)
            model.save_pretrained(str(out), state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        return out
