"""Client-side local training: one client's round on a `fedlora.models.LoraHost`.

`train_client` prepares the host for the client's payload, trains the trainable LoRA factors
with AdamW (B's learning rate may be scaled, LoRA+ style), and returns a `ClientUpdate`. It
implements the client sides of the strategies:

* ``payload.trainable``: only the listed factors get gradients; the others are bit-identical
  after training (FFA-LoRA, LoRA-A2).
* ``payload.extras["budget"]`` (LoRA-A2): the client uploads only its most important slots
  (`fedlora.strategies.lora_a2.select_slots` / `masked_upload`) with ``extras["slots"]``.
* ``payload.extras["hetlora"]`` (HetLoRA): ``lambda * self_pruning_penalty`` per module is added
  to the loss; at the end each module's rank is pruned to ``floor(gamma r)`` when its tail norm
  fell below the previous one, and ``extras["hetlora_tail_norms"]`` is returned.

Training is deterministic for a fixed seed: shuffling uses a `torch.Generator` and dropout the
global RNG inside `torch.random.fork_rng`, both seeded from (``cfg.seed``, client id, round);
the caller's global RNG state is left untouched. Global thread settings are not changed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from fedlora.contract import (
    ClientSpec,
    ClientUpdate,
    FedLoraError,
    LoraFactors,
    Payload,
    module_seed,
)
from fedlora.data import collate, encode_example
from fedlora.models import LoraHost
from fedlora.strategies.hetlora import pruned_rank, self_pruning_penalty
from fedlora.strategies.lora_a2 import masked_upload, select_slots

MODEL_INPUTS = ("input_ids", "token_type_ids", "labels")


@dataclass
class TrainConfig:
    """Local training options.

    ``local_steps`` optimizer steps per round, or ``epochs`` passes over the client's data when
    set (then ``local_steps`` is ignored). ``b_lr_multiplier`` scales B's learning rate
    (LoRA+ / LoRA-A2 style). ``grad_clip`` is the max global gradient norm (None or 0: off).
    ``max_length`` truncates pre-tokenized examples and is used when tokenizing raw ones.
    """

    local_steps: int = 10
    epochs: int | None = None
    batch_size: int = 4
    lr: float = 3e-4
    b_lr_multiplier: float = 1.0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    max_length: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> FedLoraError:
            return FedLoraError(f"TrainConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("local_steps", "batch_size", "max_length"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        if self.epochs is not None and (not is_int(self.epochs) or self.epochs < 1):
            raise bad("epochs", "None or an integer >= 1")
        if not is_num(self.lr) or self.lr <= 0:
            raise bad("lr", "a finite number > 0")
        if not is_num(self.b_lr_multiplier) or self.b_lr_multiplier <= 0:
            raise bad("b_lr_multiplier", "a finite number > 0")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "a finite number >= 0")
        if self.grad_clip is not None and (not is_num(self.grad_clip) or self.grad_clip < 0):
            raise bad("grad_clip", "None or a finite number >= 0")
        if not is_int(self.seed):
            raise bad("seed", "an integer")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise FedLoraError(f"TrainConfig: unknown option(s) {sorted(unknown)}")
        return cls(**dict(options))


# -- data ------------------------------------------------------------------------------------


def _features(
    examples: Sequence[Any], tokenizer: Any, max_length: int, who: str
) -> list[dict[str, Any]]:
    """Pre-tokenized dicts (``label`` renamed ``labels``, truncated to max_length); raw
    `fedlora.data.Example` objects are tokenized with ``encode_example`` (causal LM)."""
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, Mapping) and "input_ids" in ex:
            item = {k: v for k, v in ex.items() if k in MODEL_INPUTS or k == "label"}
        else:
            if tokenizer is None:
                raise FedLoraError(
                    f"{who}: example {i} is not pre-tokenized (no input_ids) and no tokenizer "
                    "was given"
                )
            item = dict(encode_example(tokenizer, ex, max_length))
        if "label" in item:
            item["labels"] = item.pop("label")
        if "labels" not in item:
            raise FedLoraError(f"{who}: example {i} has no labels / label")
        ids = list(item["input_ids"])
        if not ids:
            raise FedLoraError(f"{who}: example {i} has no tokens")
        item["input_ids"] = ids[:max_length]
        if "token_type_ids" in item:
            item["token_type_ids"] = list(item["token_type_ids"])[:max_length]
        if not isinstance(item["labels"], int):
            item["labels"] = list(item["labels"])[:max_length]
        out.append(item)
    return out


def _batches(n: int, cfg: TrainConfig, gen: torch.Generator) -> Iterator[list[int]]:
    """Index batches: ``epochs`` full shuffled passes, else ``local_steps`` batches drawn from
    consecutive shuffled passes (a batch may span two passes)."""
    bs = min(cfg.batch_size, n)
    if cfg.epochs is not None:
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen).tolist()
            for i in range(0, n, bs):
                yield perm[i : i + bs]
        return
    stream: list[int] = []
    for _ in range(cfg.local_steps):
        while len(stream) < bs:
            stream += torch.randperm(n, generator=gen).tolist()
        yield stream[:bs]
        stream = stream[bs:]


def _pad_id(tokenizer: Any, model: torch.nn.Module) -> int:
    for source in (tokenizer, getattr(model, "config", None)):
        pid = getattr(source, "pad_token_id", None) if source is not None else None
        if pid is not None:
            return int(pid)
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else 0


# -- training ----------------------------------------------------------------------------------


def train_client(
    host: LoraHost,
    spec: ClientSpec,
    payload: Payload,
    examples: Sequence[Any],
    cfg: TrainConfig | None = None,
    tokenizer: Any = None,
    *,
    server_round: int | None = None,
) -> ClientUpdate:
    """Train `spec`'s client locally on `examples` starting from `payload`; see the module doc.

    ``examples``: pre-tokenized dicts (``input_ids`` and ``labels`` with -100 on ignored
    positions for causal LMs; ``input_ids`` and an int ``label``/``labels`` for classifiers),
    or raw `fedlora.data.Example` objects for causal LMs together with ``tokenizer``.
    ``server_round`` (default ``payload.extras.get("round", 0)``) enters the training seed.
    """
    t0 = time.perf_counter()
    cfg = cfg or TrainConfig()
    who = f"client {spec.client_id}"
    if not examples:
        raise FedLoraError(f"{who}: no training examples")
    data = _features(examples, tokenizer, cfg.max_length, who)
    if server_round is None:
        server_round = int(payload.extras.get("round", 0))
    budget = payload.extras.get("budget")
    het = payload.extras.get("hetlora")

    model = host.prepare(spec, payload)
    before = host.read_adapter() if budget is not None else None
    a_params, b_params = host.trainable_parameters()
    if not a_params and not b_params:
        raise FedLoraError(f"{who}: nothing to train (trainable={sorted(payload.trainable)})")
    groups = []
    if a_params:
        groups.append({"params": a_params, "lr": cfg.lr})
    if b_params:
        groups.append({"params": b_params, "lr": cfg.lr * cfg.b_lr_multiplier})
    params = a_params + b_params
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pad_id = _pad_id(tokenizer, model)
    lam = float(het.get("lambda", 0.0)) if het else 0.0
    gamma = float(het.get("gamma", 1.0)) if het else 1.0
    lora = host.lora_weights() if lam > 0 else {}

    seed = module_seed(cfg.seed, f"client/{spec.client_id}", server_round)
    losses: list[float] = []
    penalties: list[float] = []
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        try:
            for idx in _batches(len(data), cfg, gen):
                batch = collate([data[i] for i in idx], pad_id)
                out = model(**batch)
                loss = out.loss
                total = loss
                if lora:
                    pen = sum(self_pruning_penalty(a, b, gamma, s) for a, b, s in lora.values())
                    total = loss + lam * pen
                    penalties.append(float(pen.detach()))
                if not torch.isfinite(total):
                    raise FedLoraError(
                        f"{who}: loss became {float(total)} at step {len(losses) + 1}; "
                        "lower TrainConfig.lr"
                    )
                opt.zero_grad(set_to_none=True)
                total.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            model.train(was_training)
            opt.zero_grad(set_to_none=True)

    after = host.read_adapter()
    adapter = after
    extras: dict[str, Any] = {}
    if budget is not None:
        slots = select_slots(before, after, payload.trainable, int(budget))
        adapter = masked_upload(after, slots)
        extras["slots"] = slots
    if het:
        prev = dict(het.get("prev_tail_norms") or {})
        tails: dict[str, float] = {}
        adapter = {}
        for m, f in after.items():
            with torch.no_grad():
                tail = float(self_pruning_penalty(f.A.double(), f.B.double(), gamma, f.scale))
            tails[m] = tail
            k = pruned_rank(f.rank, gamma, tail, prev.get(m))
            adapter[m] = (
                f if k == f.rank else LoraFactors(f.A[:k].clone(), f.B[:, :k].clone(), f.scale)
            )
        extras["hetlora_tail_norms"] = tails
        if penalties:
            extras["hetlora_penalty"] = sum(penalties) / len(penalties)
    extras.update(
        train_loss=sum(losses) / len(losses),
        first_loss=losses[0],
        last_loss=losses[-1],
        steps=float(len(losses)),
        train_seconds=time.perf_counter() - t0,
    )
    return ClientUpdate(spec.client_id, adapter, len(data), extras)
