"""Sample-level DP-SGD for one client's local training (Abadi et al., CCS 2016), with Opacus.

Each step draws a Poisson batch (every example independently with probability
``q = batch_size / n``, as the subsampled Gaussian accountant assumes), computes per-example
gradients of the client's *trainable* LoRA factors with Opacus's `GradSampleModule`, clips
each example's gradient to `clip_norm` (L2 over all trainable tensors), sums, adds Gaussian
noise of std ``noise_multiplier * clip_norm`` and divides by the expected batch size
(Opacus's `DPOptimizer` around the client's AdamW).

Wrapping order with peft (meta-pytorch/opacus#820: silently corrupted LoRA updates unless the
model is on its device before `get_peft_model`): the base model is placed first, then the
`LoraHost` puts the peft adapter on it and freezes what the payload freezes
(``payload.trainable``: FFA-LoRA's A, LoRA-A2's alternating factor), and only then `DPSGD`
wraps it, so Opacus hooks exactly the trainable `lora_A` / `lora_B` Linear layers; the hooks
are removed when training ends (the host's model is reused by the next client).

Per-example losses are each example's own token-mean cross-entropy (causal LMs) or its
cross-entropy (classifiers), summed over the batch: a batch mean over tokens would make one
example's gradient depend on the others' lengths.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fedlora.core.contract import FedLoraError
from fedlora.core.privacy import LocalDP, secret_normal, secret_uniform
from fedlora.data import collate


def poisson_batches(
    n: int, rate: float, steps: int, secret: int, *names: Any
) -> Iterator[list[int]]:
    """`steps` batches, each example in each independently with probability `rate` (a batch
    may be empty: the step is then noise only), from uniforms keyed by the client's whole
    `secret` and `names` (`fedlora.core.privacy.secret_uniform`; no 32-bit torch seed)."""
    for step in range(steps):
        keep = secret_uniform(secret, n, "dp-sgd-batch", *names, step) < rate
        yield [int(i) for i in keep.nonzero()[0]]


def per_example_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Each example's loss: cross-entropy of an int label (classifier), or the token-mean
    next-token cross-entropy over its non-ignored (-100) labels (causal LM)."""
    if labels.ndim == 1:
        return nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    ce = nn.functional.cross_entropy(
        lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100, reduction="none"
    ).view(lb.shape)
    return ce.sum(1) / (lb != -100).sum(1).clamp_min(1)


class DPSGD:
    """DP-SGD around a client's model and optimizer for one round; use as a context manager
    (the Opacus hooks are removed on exit)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dp: LocalDP,
        expected_batch_size: int,
        secret: int,
        autocast: Callable[[], Any] = contextlib.nullcontext,
        names: Sequence[Any] = (),
    ) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise FedLoraError("DP-SGD: the model has no trainable parameters")
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        self.device = self.params[0].device
        self.autocast = autocast  # the client's mixed precision (`fedlora.clients.device.Amp`)
        self.secret, self.names, self.steps = int(secret), tuple(names), 0
        self.opt = DPOptimizer(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.clip_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",  # the noisy sum is divided by the expected batch size
        )
        # Opacus draws its noise from a torch generator (a CPU one keeps 32 bits of its seed):
        # the noise comes instead from SHAKE-256 keyed by the client's whole secret
        self.opt.add_noise = self._add_noise

    def _add_noise(self) -> None:
        """Opacus's `DPOptimizer.add_noise` with keyed noise: ``summed_grad + N(0, (sigma
        C)^2)`` into ``p.grad``, a stream per step and parameter."""
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        std = self.opt.noise_multiplier * self.opt.max_grad_norm
        for i, p in enumerate(self.opt.params):
            _check_processed_flag(p.summed_grad)
            z = secret_normal(
                self.secret, p.summed_grad.shape, "dp-sgd-noise", *self.names, self.steps, i
            )
            noise = (z * std).to(device=p.summed_grad.device, dtype=p.summed_grad.dtype)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)
        self.steps += 1

    def __enter__(self) -> DPSGD:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.gsm._close()  # removes hooks and grad_sample attributes

    def grad_samples(self, examples: Sequence[dict], pad_id: int) -> Tensor:
        """Forward and backward a batch; leaves each trainable parameter's per-example
        gradients in ``p.grad_sample`` and returns the per-example losses."""
        batch = {k: v.to(self.device) for k, v in collate(list(examples), pad_id).items()}
        labels = batch.pop("labels")
        with warnings.catch_warnings():  # frozen inputs: Opacus hooks on module outputs
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            with self.autocast():
                out = self.gsm(**batch)
                losses = per_example_loss(out.logits, labels)
            losses.sum().backward()
        return losses.detach()

    def step(self, examples: Sequence[dict], pad_id: int) -> Tensor | None:
        """One DP-SGD step on `examples` (possibly none); returns their per-example losses."""
        losses = None
        if examples:
            losses = self.grad_samples(examples, pad_id)
        else:  # an empty Poisson batch: Opacus adds the noise to a zero sum
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return losses
