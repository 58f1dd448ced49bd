"""Client-side local training: one client's round on a `fedlora.clients.models.LoraHost`.

`train_client` prepares the host for the client's payload, trains the trainable LoRA factors
with AdamW (B's learning rate may be scaled, LoRA+ style), and returns a `ClientUpdate`. It
implements the client sides of the strategies:

* ``payload.trainable``: only the listed factors get gradients; the others are bit-identical
  after training (FFA-LoRA, LoRA-A2).
* ``payload.extras["budget"]`` (LoRA-A2): the client uploads only its most important slots
  (`fedlora.strategies.lora_a2.select_slots` / `masked_upload`) with ``extras["slots"]``. With
  ``extras["masked_training"]`` it picks them before training, from the first step's
  gradient, and trains only those slots (`_a2_probe_slots`, `SlotMask`); otherwise it trains
  every slot and picks from the whole local change.
* Dense modules of the host (``modules_to_save``, a classifier head) are trained with A's
  learning rate and returned in ``ClientUpdate.dense``.
* ``payload.extras["hetlora"]`` (HetLoRA): ``lambda * self_pruning_penalty`` per module is added
  to the loss; at the end each module's rank is pruned to ``floor(gamma r)`` when its tail norm
  fell below the previous one, and ``extras["hetlora_tail_norms"]`` is returned.

Training is deterministic for a fixed seed: shuffling uses a `torch.Generator` and dropout the
global RNG inside `torch.random.fork_rng`, both seeded from (``cfg.seed``, client id, round);
the caller's global RNG state is left untouched. Global thread settings are not changed.

The step loop (micro-batches, gradient accumulation, autocast, clipping, learning-rate
schedule) is `fedlora.clients.local_steps`; device and precision policy is
`fedlora.clients.device`. Batches and the active factors live on the host's device; the
returned update is CPU float32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from fedlora.clients.device import (
    DEVICE_PATTERN,
    PRECISIONS,
    Amp,
    resolve_device,
    resolve_precision,
)
from fedlora.clients.host import LoraHost
from fedlora.clients.local_steps import SCHEDULERS, gradient_checkpointing, lr_factor, run_steps
from fedlora.core.contract import (
    ClientSpec,
    ClientUpdate,
    FedLoraError,
    LoraFactors,
    Payload,
    module_seed,
)
from fedlora.data import collate, encode_example
from fedlora.data import pad_id as padding_id
from fedlora.strategies.hetlora import pruned_rank, self_pruning_penalty
from fedlora.strategies.lora_a2 import Budget, masked_upload, select_slots

MODEL_INPUTS = ("input_ids", "token_type_ids", "labels")


@dataclass
class TrainConfig:
    """Local training options.

    ``local_steps`` optimizer steps per round, or ``epochs`` passes over the client's data when
    set (then ``local_steps`` is ignored). ``b_lr_multiplier`` scales B's learning rate
    (LoRA+ / LoRA-A2 style). ``grad_clip`` is the max global gradient norm (None or 0: off).
    ``max_length`` truncates pre-tokenized examples and is used when tokenizing raw ones.

    ``device``: must be the host's (``"auto"``: wherever the host's model lives; an explicit
    device names where `fedlora.clients.models.load_model` should have put it). ``precision``:
    autocast of the forward passes, ``"fp32"`` | ``"bf16"`` | ``"fp16"`` | ``"auto"`` (bf16
    where the device computes it natively, see `fedlora.clients.device`); the LoRA factors and
    AdamW state stay float32. Its default here is ``"fp32"`` (a library call computes exactly
    what it did before); the experiment configuration's ``train.precision`` defaults to ``"auto"``.
    ``grad_accum_steps`` micro-batches of ``batch_size`` make one optimizer step.
    ``lr_scheduler`` (``"constant"`` | ``"linear"`` | ``"cosine"``) after ``warmup_steps``
    runs over one client's local steps of one round (clients are stateless between rounds).
    ``compile``: the training forward runs through `torch.compile` (`LoraHost.compiled`): the
    first step of each new adapter shape, scale or trainable set pays a compilation (minutes
    for a 135M model on a CPU), later steps run fused kernels; not with local DP-SGD.
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
    device: str = "auto"
    precision: str = "fp32"
    grad_accum_steps: int = 1
    gradient_checkpointing: bool = False
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> FedLoraError:
            return FedLoraError(f"TrainConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("local_steps", "batch_size", "max_length", "grad_accum_steps"):
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
        if not isinstance(self.device, str) or not DEVICE_PATTERN.match(self.device):
            raise bad("device", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"one of {PRECISIONS}")
        for name in ("gradient_checkpointing", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        if self.lr_scheduler not in SCHEDULERS:
            raise bad("lr_scheduler", f"one of {SCHEDULERS}")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise bad("warmup_steps", "an integer >= 0")

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
    """Index micro-batches: ``epochs`` full shuffled passes, else ``local_steps *
    grad_accum_steps`` micro-batches drawn from consecutive shuffled passes (a micro-batch may
    span two passes)."""
    bs = min(cfg.batch_size, n)
    if cfg.epochs is not None:
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen).tolist()
            for i in range(0, n, bs):
                yield perm[i : i + bs]
        return
    stream: list[int] = []
    for _ in range(cfg.local_steps * cfg.grad_accum_steps):
        while len(stream) < bs:
            stream += torch.randperm(n, generator=gen).tolist()
        yield stream[:bs]
        stream = stream[bs:]


def _steps(micro: list[list[int]], k: int) -> list[list[list[int]]]:
    """Micro-batches grouped ``k`` per optimizer step (the last step may have fewer)."""
    return [micro[i : i + k] for i in range(0, len(micro), k)]


# -- training ----------------------------------------------------------------------------------


def _client_device(host: LoraHost, cfg: TrainConfig, who: str) -> torch.device:
    """The host's device; an explicit ``cfg.device`` must be it (models are placed at load)."""
    device = host.device
    if cfg.device != "auto":
        wanted = resolve_device(cfg.device, "TrainConfig.device")
        same = wanted.type == device.type and (wanted.index or 0) == (device.index or 0)
        if not same:
            raise FedLoraError(
                f"{who}: TrainConfig.device = {cfg.device!r} but the host's model is on "
                f"{device}; load it there (fedlora.clients.models.load_model(..., device=...))"
            )
    return device


def _optimizer(host: LoraHost, cfg: TrainConfig, who: str, payload: Payload):
    """AdamW over the active adapter's trainable factors and the dense modules."""
    a_params, b_params = host.trainable_parameters()
    return build_optimizer(a_params, b_params, host.dense_parameters(), cfg, who, payload)


def build_optimizer(
    a_params: list, b_params: list, dense: list, cfg: TrainConfig, who: str, payload: Payload
) -> tuple[torch.optim.AdamW, list]:
    """AdamW over trainable factors (B at ``lr * b_lr_multiplier``) and dense parameters (a
    classifier head, at ``lr``); returns it with every parameter it trains (for clipping)."""
    if not a_params and not b_params:
        raise FedLoraError(f"{who}: nothing to train (trainable={sorted(payload.trainable)})")
    groups = []
    if a_params or dense:
        groups.append({"params": a_params + dense, "lr": cfg.lr})
    if b_params:
        groups.append({"params": b_params, "lr": cfg.lr * cfg.b_lr_multiplier})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, a_params + b_params + dense


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _check_dp(
    host: LoraHost, cfg: TrainConfig, lam: float, who: str, privacy: Any, payload: Payload
) -> None:
    """What local DP-SGD cannot train: a dense module, a compiled forward, HetLoRA's penalty;
    and a payload asking for what would weaken it (`fedlora.core.privacy.local_dp_refusal`:
    refused with a one-line reason)."""
    from fedlora.core.privacy import PrivacyRefusal, local_dp_refusal

    reason = local_dp_refusal(privacy, payload.extras)
    if reason:
        raise PrivacyRefusal(f"{who}: {reason}")
    if lam > 0:
        raise FedLoraError(
            f"{who}: HetLoRA's self-pruning penalty is not supported with local DP-SGD"
        )
    if host.dense_parameters():
        raise FedLoraError(
            f"{who}: DP-SGD covers the LoRA factors only, not dense modules (a "
            "classifier head); set model.modules_to_save = [] to run it"
        )
    if cfg.compile:
        raise FedLoraError(f"{who}: TrainConfig.compile is not supported with DP-SGD")


def train_client(
    host: LoraHost,
    spec: ClientSpec,
    payload: Payload,
    examples: Sequence[Any],
    cfg: TrainConfig | None = None,
    tokenizer: Any = None,
    *,
    server_round: int | None = None,
    privacy: Any = None,
) -> ClientUpdate:
    """Train `spec`'s client locally on `examples` starting from `payload`; see the module doc.

    ``privacy`` (a `fedlora.clients.dp_sgd.LocalDP`): train with sample-level DP-SGD instead
    (Poisson batches, per-example clipping and noise; ``cfg.grad_clip`` does not apply) and
    report ``dp_steps``, ``dp_sample_rate`` and ``dp_noise_multiplier`` in the extras.

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

    device = _client_device(host, cfg, who)
    model = host.prepare(spec, payload)
    before = host.read_adapter() if budget is not None else None
    opt, params = _optimizer(host, cfg, who, payload)
    pad_id = padding_id(tokenizer, model)
    lam = float(het.get("lambda", 0.0)) if het else 0.0
    gamma = float(het.get("gamma", 1.0)) if het else 1.0
    lora = host.lora_weights() if lam > 0 else {}
    if privacy is not None:
        _check_dp(host, cfg, lam, who, privacy, payload)

    def penalty() -> torch.Tensor:
        return sum(self_pruning_penalty(a, b, gamma, s) for a, b, s in lora.values())

    base = _seed_base(cfg, privacy)  # under local DP: the client's whole secret
    seed = module_seed(base, f"client/{spec.client_id}", server_round)
    was_training = model.training
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        steps = plan_steps(len(data), cfg, gen)
        batches = (  # collated and moved to the device one step at a time
            [_to(collate([data[i] for i in idx], pad_id), device) for idx in micro]
            for micro in steps
        )
        amp = Amp(device, resolve_precision(cfg.precision, device))
        model.train()
        slots = mask = None
        if budget is not None and payload.extras.get("masked_training"):
            first = [_to(collate([data[i] for i in idx], pad_id), device) for idx in steps[0]]
            slots = _a2_probe_slots(host, model, first, amp, payload, budget)
            mask = SlotMask(host.lora_weights(), slots, payload.trainable, opt)
        dp_extras: dict[str, float] = {}
        try:
            if privacy is not None:  # DP-SGD runs its own loop (Poisson batches)
                names = (spec.client_id, server_round)
                losses, dp_extras = _train_dp(
                    model, opt, data, cfg, privacy, pad_id, (base, names), amp
                )
                penalties = []
            else:
                with gradient_checkpointing(model, cfg.gradient_checkpointing, who):
                    losses, penalties = run_steps(
                        host.compiled() if cfg.compile else model,
                        batches,
                        opt,
                        params,
                        amp=amp,
                        grad_clip=cfg.grad_clip,
                        schedule=lambda s: lr_factor(
                            s, len(steps), cfg.lr_scheduler, cfg.warmup_steps
                        ),
                        penalty=penalty if lora else None,
                        penalty_weight=lam,
                        who=who,
                    )
        finally:
            if mask is not None:
                mask.remove()
            model.train(was_training)
            opt.zero_grad(set_to_none=True)

    trained = TrainedState(host.read_adapter(), host.read_dense(), losses, penalties, slots)
    return make_update(spec, payload, before, trained, len(data), dp_extras, t0, privacy)


def client_seed(cfg: TrainConfig, spec: ClientSpec, server_round: int, privacy: Any = None) -> int:
    """The seed of a client's round: its batch order, its dropout stream and under local DP
    its DP-SGD noise (from `_seed_base`)."""
    return module_seed(_seed_base(cfg, privacy), f"client/{spec.client_id}", server_round)


def plan_steps(n: int, cfg: TrainConfig, gen: torch.Generator) -> list[list[list[int]]]:
    """A client's optimizer steps as lists of index micro-batches, drawn from `gen`."""
    return _steps(list(_batches(n, cfg, gen)), cfg.grad_accum_steps)


@dataclass
class TrainedState:
    """What local training leaves behind: the trained factors and dense tensors (CPU
    float32), per-step losses and HetLoRA penalties, LoRA-A2 slots picked before training."""

    adapter: dict[str, LoraFactors]
    dense: dict[str, torch.Tensor]
    losses: list[float]
    penalties: list[float]
    slots: dict[str, torch.Tensor] | None = None


def make_update(
    spec: ClientSpec,
    payload: Payload,
    before: Any,
    trained: TrainedState,
    num_examples: int,
    dp_extras: dict[str, float],
    t0: float,
    privacy: Any = None,
) -> ClientUpdate:
    """The `ClientUpdate` of a trained client: the strategies' client-side post-processing
    (`_client_side`) and the training extras (losses, steps, seconds since `t0`; under local
    DP no raw loss: it is not privatised)."""
    het = payload.extras.get("hetlora")
    gamma = float(het.get("gamma", 1.0)) if het else 1.0
    losses = trained.losses
    adapter, extras = _client_side(
        payload, before, trained.adapter, gamma, trained.penalties, trained.slots
    )
    if privacy is None:
        extras.update(dp_extras, **_loss_extras(losses), train_seconds=time.perf_counter() - t0)
    else:  # neither raw losses nor the time it took (a 512-token example shows in it)
        extras.update(dp_extras, steps=float(len(losses)))
    return ClientUpdate(spec.client_id, adapter, num_examples, extras, trained.dense)


def _seed_base(cfg: TrainConfig, privacy: Any) -> int:
    """What a client's batches, dropout and DP-SGD noise are drawn from: the public training
    seed, or under local DP the client's own secret (drawn from the OS when it has none), so
    nobody holding its inputs and the configuration can replay its update."""
    if privacy is None or privacy.seeded:
        return cfg.seed
    if privacy.secret is not None:
        return int(privacy.secret)
    import secrets

    return secrets.randbits(128)


def _loss_extras(losses: Sequence[float]) -> dict[str, float]:
    """The training losses a client reports (NaN under DP-SGD when every Poisson batch was
    empty)."""
    nan = float("nan")
    return {
        "train_loss": sum(losses) / len(losses) if losses else nan,
        "first_loss": losses[0] if losses else nan,
        "last_loss": losses[-1] if losses else nan,
        "steps": float(len(losses)),
    }


def _client_side(
    payload: Payload,
    before: Any,
    after: dict[str, LoraFactors],
    gamma: float,
    penalties,
    slots: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, LoraFactors], dict[str, Any]]:
    """The strategies' client-side post-processing of the trained adapter: LoRA-A2's slot
    selection (``extras["budget"]``; `slots` when they were picked before training),
    HetLoRA's self-pruning (``extras["hetlora"]``)."""
    budget = payload.extras.get("budget")
    het = payload.extras.get("hetlora")
    adapter = after
    extras: dict[str, Any] = {}
    if budget is not None:
        if slots is None:  # trained every slot: pick from the whole local change
            slots = select_slots(before, after, payload.trainable, budget)
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
    return adapter, extras


def _train_dp(
    model, opt, data, cfg, privacy, pad_id, key, amp
) -> tuple[list[float], dict[str, float]]:
    """The local steps under DP-SGD (`fedlora.clients.dp_sgd`): each non-empty batch's mean
    per-example loss, and the accounting extras. ``key`` = (the client's whole secret, the
    names of its round): its Poisson batches and noise are keyed by all of it."""
    from fedlora.clients.dp_sgd import DPSGD, poisson_batches
    from fedlora.core.accounting import local_sample_rate, local_steps

    n = len(data)
    q = local_sample_rate(n, cfg.batch_size)
    steps = local_steps(n, cfg.batch_size, cfg.local_steps, cfg.epochs)
    secret, names = key
    losses: list[float] = []
    with DPSGD(model, opt, privacy, min(cfg.batch_size, n), secret, amp.autocast, names) as dp:
        for idx in poisson_batches(n, q, steps, secret, *names):
            per_example = dp.step([data[i] for i in idx], pad_id)
            if per_example is None:
                continue
            loss = float(per_example.mean())
            if not math.isfinite(loss):
                raise FedLoraError(
                    f"client: loss became {loss} at DP-SGD step {len(losses) + 1}; "
                    "lower TrainConfig.lr"
                )
            losses.append(loss)
    return losses, {
        "dp_steps": float(steps),
        "dp_sample_rate": q,
        "dp_noise_multiplier": float(privacy.noise_multiplier),
    }


# -- LoRA-A2 masked training ------------------------------------------------------------------


def _a2_probe_slots(
    host: LoraHost, model: torch.nn.Module, micro: list, amp: Amp, payload: Payload, budget: Budget
) -> dict[str, torch.Tensor]:
    """LoRA-A2's slots picked before training: `select_slots` on the first-order change of one
    gradient step on the first step's micro-batches (dB = -grad B, or dA = -grad A), so the
    importance ``||dB[:, i] A[i, :]||`` is the paper's, measured on the client's own data."""
    weights = host.lora_weights()
    for p in model.parameters():
        p.grad = None
    for batch in micro:
        with amp.autocast():
            loss = model(**batch).loss
        (loss / len(micro)).backward()
    slots = slots_from_grads(weights, payload.trainable, budget)
    for p in model.parameters():
        p.grad = None
    return slots


def slots_from_grads(
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]], trainable, budget: Budget
) -> dict[str, torch.Tensor]:
    """`select_slots` on the first-order change ``-grad`` of the factors in `weights` (module
    -> (A, B, scale), their ``.grad`` holding the probe step's gradient)."""
    before, after = {}, {}
    with torch.no_grad():
        for m, (a, b, s) in weights.items():
            A, B = a.detach().float().cpu(), b.detach().float().cpu()
            dA = -a.grad.float().cpu() if a.grad is not None else torch.zeros_like(A)
            dB = -b.grad.float().cpu() if b.grad is not None else torch.zeros_like(B)
            before[m] = LoraFactors(A, B, s)
            after[m] = LoraFactors(A + dA, B + dB, s)
    return select_slots(before, after, trainable, budget)


class SlotMask:
    """Keeps every unselected LoRA-A2 slot of the trained factor(s) fixed: a gradient hook
    zeroes its gradient (so clipping and Adam never see it) and an optimizer post-step hook
    restores its value (weight decay would move it).

    ``weights``: module -> (A, B, scale) being trained. ``hook=False`` (factors that are views
    outside autograd, `fedlora.clients.parallel`): the caller calls `mask_grads` before clipping.
    """

    def __init__(
        self, weights, slots, trainable, opt: torch.optim.Optimizer, hook: bool = True
    ) -> None:
        self.items = []
        self.handles = []
        for m, (a, b, _s) in weights.items():
            for p, dim in [(a, 0)] * ("A" in trainable) + [(b, 1)] * ("B" in trainable):
                keep = torch.zeros(p.shape[dim], dtype=torch.bool, device=p.device)
                if m in slots:
                    keep[slots[m].to(p.device)] = True
                frozen = (~keep).view((1, -1) if dim == 1 else (-1, 1)).expand_as(p)
                self.items.append((p, frozen, p.detach().clone()))
                if hook:
                    self.handles.append(p.register_hook(lambda g, f=frozen: g.masked_fill(f, 0.0)))
        self.handles.append(opt.register_step_post_hook(lambda *_: self.restore()))

    def mask_grads(self) -> None:
        """Zero the gradient of every unselected slot (in place)."""
        for p, frozen, _orig in self.items:
            if p.grad is not None:
                p.grad.masked_fill_(frozen, 0.0)

    def restore(self) -> None:
        with torch.no_grad():
            for p, frozen, orig in self.items:
                p.copy_(torch.where(frozen, orig, p))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
