"""The step loop of local training: micro-batches, gradient accumulation, mixed precision,
gradient clipping and the learning-rate schedule.

One optimizer step consumes ``grad_accum_steps`` micro-batches. Each micro-batch's mean loss
is weighted by its share of the step's target tokens (examples, for a classifier), so ``k``
micro-batches of ``b`` examples give the gradient of one batch of ``k * b`` examples with a
token-weighted mean loss. Forward passes run under `fedlora.clients.device.Amp` autocast; backward,
clipping and AdamW run on the float32 LoRA factors (fp16 through a gradient scaler).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from fedlora.clients.device import Amp
from fedlora.core.contract import FedLoraError

SCHEDULERS = ("constant", "linear", "cosine")
IGNORE_INDEX = -100

Batch = dict[str, torch.Tensor]


def lr_factor(step: int, total: int, scheduler: str, warmup: int) -> float:
    """The learning-rate multiplier of optimizer step `step` (0-based) of `total`.

    Warm-up: ``(step + 1) / (warmup + 1)`` for the first ``warmup`` steps (never 0, so every
    step trains). Then ``"constant"``: 1; ``"linear"``: ``(total - step) / (total - warmup)``;
    ``"cosine"``: ``(1 + cos(pi (step - warmup) / (total - warmup))) / 2``; both start at 1
    and stay above 0 on the last step.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if scheduler == "constant":
        return 1.0
    span = max(1, total - warmup)
    if scheduler == "linear":
        return (total - step) / span
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))
    raise FedLoraError(f"lr_scheduler = {scheduler!r}: choose one of {SCHEDULERS}")


def target_count(batch: Batch) -> int:
    """Targets the mean loss of `batch` averages over: a causal LM's label tokens after the
    one-position shift, or a classifier's examples."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return int(labels.shape[0])
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@contextlib.contextmanager
def gradient_checkpointing(model: torch.nn.Module, on: bool, who: str) -> Iterator[None]:
    """Context: transformers' gradient checkpointing (non-reentrant) when `on`: activations
    are recomputed in the backward pass instead of stored (less memory, ~1/3 more compute)."""
    if not on:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise FedLoraError(
            f"{who}: train.gradient_checkpointing: {type(model).__name__} does not support it"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        disable = model.activation_checkpointing_disable
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        disable = model.gradient_checkpointing_disable
    try:
        yield
    finally:
        disable()


def run_steps(
    model: torch.nn.Module,
    steps: Iterable[Sequence[Batch]],
    opt: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    *,
    amp: Amp,
    grad_clip: float | None,
    schedule: Callable[[int], float],
    penalty: Callable[[], torch.Tensor] | None = None,
    penalty_weight: float = 0.0,
    who: str = "client",
) -> tuple[list[float], list[float]]:
    """Run one optimizer step per entry of `steps` (its micro-batches, already on the device).

    ``schedule(step)`` multiplies the optimizer's learning rates; ``penalty_weight * penalty()``
    (HetLoRA's self-pruning term) is added to the loss once per step. Returns the per-step
    token-weighted losses and the (unweighted) penalties.
    """
    scaler = amp.scaler()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses: list[float] = []
    penalties: list[float] = []
    for micro in steps:
        opt.zero_grad(set_to_none=True)
        losses.append(_accumulate(model, micro, amp, scaler, who, len(losses) + 1))
        if penalty is not None:
            pen = penalty()
            check_penalty(pen, who)
            scaler.scale(penalty_weight * pen).backward()
            penalties.append(float(pen.detach()))
        optimizer_step(opt, scaler, sched, params, grad_clip)
    return losses, penalties


def check_loss(loss: torch.Tensor, who: str, step: int) -> None:
    """A non-finite loss stops the client (it is dropped for the round, not the run)."""
    if not torch.isfinite(loss):
        raise FedLoraError(f"{who}: loss became {float(loss)} at step {step}; lower TrainConfig.lr")


def check_penalty(pen: torch.Tensor, who: str) -> None:
    if not torch.isfinite(pen):
        raise FedLoraError(f"{who}: the HetLoRA penalty became {float(pen)}")


def micro_weight(loss: torch.Tensor, n: int, total: int, count: int) -> torch.Tensor:
    """A micro-batch's mean loss weighted by its share of the step's `total` targets (one of
    `count` micro-batches; a single micro-batch is left unscaled)."""
    return loss if count == 1 else loss * (n / total)


def optimizer_step(
    opt: torch.optim.Optimizer,
    scaler: Any,
    sched: Any,
    params: Sequence[torch.nn.Parameter],
    grad_clip: float | None,
) -> None:
    """Everything after the gradients of one step: unscale (fp16), clip the global norm of
    `params`, step (skipped by the scaler on an fp16 overflow), and advance the schedule."""
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()


def _accumulate(
    model: torch.nn.Module, micro: Sequence[Batch], amp: Amp, scaler: Any, who: str, step: int
) -> float:
    """Forward and backward every micro-batch of one step; returns the step's loss."""
    counts = [target_count(b) for b in micro]
    total = sum(counts)
    loss_sum = 0.0
    for batch, n in zip(micro, counts):
        if n == 0 and total > 0:
            continue  # no targets: contributes nothing (its mean loss would be 0/0)
        with amp.autocast():
            loss = model(**batch).loss
        check_loss(loss, who, step)
        weighted = micro_weight(loss, n, total, len(micro))
        scaler.scale(weighted).backward()
        loss_sum += float(weighted.detach())
    return loss_sum
