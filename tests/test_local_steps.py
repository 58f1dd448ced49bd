"""fedlora.clients.local_steps and mixed precision in train_client, on the tiny random Llama (CPU):
gradient accumulation, gradient checkpointing, the learning-rate schedule, bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import llama_host

from fedlora.clients.device import Amp
from fedlora.clients.local_steps import gradient_checkpointing, lr_factor, run_steps
from fedlora.clients.train import TrainConfig, train_client
from fedlora.core.contract import ClientSpec, FedLoraError, Payload
from fedlora.data import collate

CPU = torch.device("cpu")


def lm_examples(n: int = 8, seed: int = 0) -> list[dict]:
    """Examples of different lengths and label counts (prompt tokens masked with -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + (3 * i) % 7
        ids = torch.randint(1, 128, (length,), generator=g).tolist()
        masked = 1 + i % 3
        out.append({"input_ids": ids, "labels": [-100] * masked + ids[masked:]})
    return out


def prepared_host(seed: int = 3):
    host = llama_host()
    spec = ClientSpec("c", {m: 4 for m in host.module_names()})
    # non-zero B, so that A gets gradients too
    payload = Payload(None, None, seed=seed)
    host.prepare(spec, payload)
    with torch.no_grad():
        for _, b, _ in host.lora_weights().values():
            b.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
    a, b = host.trainable_parameters()
    return host, a + b


def sgd_gradients(micro_batches) -> list[torch.Tensor]:
    """-(parameter change) of one SGD step with lr 1: the step's accumulated gradient."""
    host, params = prepared_host()
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)
    run_steps(
        host.model, [micro_batches], opt, params, amp=Amp(CPU), grad_clip=None, schedule=lambda s: 1
    )
    return [(b - p.detach()).double() for b, p in zip(before, params)]


def test_accumulation_of_k_micro_batches_equals_one_batch_of_k_times_b():
    data = lm_examples(8)
    pad = 0
    whole = collate(data, pad)
    halves = [collate(data[:4], pad), collate(data[4:], pad)]
    quarters = [collate(data[i : i + 2], pad) for i in range(0, 8, 2)]
    ref = sgd_gradients([whole])  # HF's own mean over all label tokens of the 8 examples
    for micro in (halves, quarters):
        got = sgd_gradients(micro)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    # a plain mean of the micro-batch means would differ (the label counts differ)
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in halves]
    assert counts[0] != counts[1]


def test_accumulation_steps_count_and_losses_in_train_client():
    host = llama_host()
    spec = ClientSpec("c", {m: 4 for m in host.module_names()})
    u = train_client(
        host,
        spec,
        Payload(None, None),
        lm_examples(8),
        TrainConfig(local_steps=3, batch_size=2, grad_accum_steps=2, seed=1),
    )
    assert u.extras["steps"] == 3.0  # optimizer steps, each of 2 micro-batches
    u2 = train_client(
        host,
        spec,
        Payload(None, None),
        lm_examples(8),
        TrainConfig(epochs=1, batch_size=2, grad_accum_steps=3, seed=1),
    )
    assert u2.extras["steps"] == 2.0  # 4 micro-batches: 3 + 1


def test_gradient_checkpointing_gives_the_same_gradients():
    data = lm_examples(6)
    batch = collate(data, 0)
    grads = []
    for on in (False, True):
        host, params = prepared_host()
        host.model.train()
        with gradient_checkpointing(host.model, on, "client c"):
            assert host.model.is_gradient_checkpointing == on
            host.model(**batch).loss.backward()
        grads.append([p.grad.detach().clone() for p in params])
        assert not host.model.is_gradient_checkpointing  # switched off again
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-8)


def test_gradient_checkpointing_unsupported_is_named():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(FedLoraError, match="client x: train.gradient_checkpointing: Linear"):
        with gradient_checkpointing(model, True, "client x"):
            pass


def test_lr_factor_by_hand():
    # warm-up 2 of 6 steps: 1/3, 2/3, then the schedule over the remaining 4
    assert [lr_factor(s, 6, "constant", 2) for s in range(6)] == pytest.approx(
        [1 / 3, 2 / 3, 1, 1, 1, 1]
    )
    assert [lr_factor(s, 6, "linear", 2) for s in range(6)] == pytest.approx(
        [1 / 3, 2 / 3, 1, 0.75, 0.5, 0.25]
    )
    cos = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [lr_factor(s, 6, "cosine", 2) for s in range(6)] == pytest.approx([1 / 3, 2 / 3, *cos])
    assert [lr_factor(s, 3, "linear", 0) for s in range(3)] == pytest.approx([1, 2 / 3, 1 / 3])


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
def test_train_client_applies_the_schedule_per_step(monkeypatch, scheduler):
    seen: list[list[float]] = []
    original = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append([g["lr"] for g in self.param_groups])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    host = llama_host()
    spec = ClientSpec("c", {m: 2 for m in host.module_names()})
    cfg = TrainConfig(
        local_steps=5, lr=1e-2, b_lr_multiplier=4.0, lr_scheduler=scheduler, warmup_steps=1
    )
    train_client(host, spec, Payload(None, None), lm_examples(8), cfg)
    factors = [lr_factor(s, 5, scheduler, 1) for s in range(5)]
    assert len(seen) == 5
    for lrs, f in zip(seen, factors):
        assert lrs == pytest.approx([1e-2 * f, 4e-2 * f])


def test_bf16_autocast_tracks_fp32_and_keeps_fp32_master_weights():
    data = lm_examples(8)
    spec_ranks = None
    runs = {}
    for precision in ("fp32", "bf16"):
        host = llama_host()
        spec_ranks = spec_ranks or {m: 4 for m in host.module_names()}
        cfg = TrainConfig(local_steps=6, batch_size=4, lr=1e-2, seed=2, precision=precision)
        u = train_client(host, ClientSpec("c", spec_ranks), Payload(None, None), data, cfg)
        for a, b, _ in host.lora_weights().values():
            assert a.dtype == b.dtype == torch.float32  # master weights
        runs[precision] = u
    f32, b16 = runs["fp32"], runs["bf16"]
    for k in ("first_loss", "last_loss", "train_loss"):
        assert abs(b16.extras[k] - f32.extras[k]) < 0.01 * f32.extras[k], k
    # the learned deltas (zero at the start) agree to 20%: AdamW's normalised steps amplify
    # bf16's small gradient differences; a different training seed lands ~100% away
    for m, f in f32.adapter.items():
        d32, d16 = f.delta(), b16.adapter[m].delta()
        assert float((d16 - d32).norm()) < 0.2 * float(d32.norm()), m
    assert b16.adapter[m].A.dtype == torch.float32 and b16.adapter[m].A.device.type == "cpu"


def test_bf16_forward_logits_close_to_fp32():
    host, _ = prepared_host()
    batch = collate(lm_examples(4), 0)
    host.model.eval()
    with torch.no_grad():
        ref = host.model(**batch).logits
        with Amp(CPU, torch.bfloat16).autocast():
            got = host.model(**batch).logits
    assert got.dtype == torch.bfloat16
    err = float((got.float() - ref).norm() / ref.norm())
    assert 0 < err < 2e-2  # bf16 rounding, not exactness and not garbage


def test_explicit_device_must_be_the_hosts(monkeypatch):
    host = llama_host()
    spec = ClientSpec("zed", {m: 2 for m in host.module_names()})
    cfg = TrainConfig(local_steps=1, device="cpu")
    assert train_client(host, spec, Payload(None, None), lm_examples(4), cfg).extras["steps"] == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(FedLoraError, match=r"client zed: TrainConfig.device = 'cuda'.* on cpu"):
        train_client(host, spec, Payload(None, None), lm_examples(4), TrainConfig(device="cuda"))


def test_fp16_trains_through_the_gradient_scaler(monkeypatch):
    scaled = []
    original = torch.amp.GradScaler.scale

    def record(self, outputs):
        scaled.append(self.is_enabled())
        return original(self, outputs)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", record)
    data = lm_examples(8)
    host = llama_host()
    spec = ClientSpec("c", {m: 4 for m in host.module_names()})
    cfg = TrainConfig(local_steps=3, lr=1e-2, seed=2)
    f32 = train_client(host, spec, Payload(None, None), data, cfg)
    assert scaled and not any(scaled)
    scaled.clear()
    cfg16 = TrainConfig(local_steps=3, lr=1e-2, seed=2, precision="fp16")
    f16 = train_client(host, spec, Payload(None, None), data, cfg16)
    assert scaled and all(scaled)  # every backward went through an enabled scaler
    assert f16.extras["first_loss"] == pytest.approx(f32.extras["first_loss"], rel=1e-2)
    assert f16.extras["last_loss"] == pytest.approx(f32.extras["last_loss"], rel=2e-2)


def test_a_small_lora_term_survives_bf16_autocast():
    """Under bf16 autocast a target's output is upcast before peft adds s B A x, so a LoRA
    term far below a bf16 ulp of the output is kept (float64 reference on the bf16 inputs)."""
    host, _ = prepared_host()
    with torch.no_grad():
        for _, b, _ in host.lora_weights().values():
            b.normal_(0, 1e-5, generator=torch.Generator().manual_seed(5))
    name, (a, b, s) = next(iter(host.lora_weights().items()))
    layer = next(m for m in host.model.modules() if getattr(m, "base_layer", None) is not None
                 and m.base_layer is host._base[name])  # fmt: skip
    x = torch.randn(16, a.shape[1], generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), Amp(CPU, torch.bfloat16).autocast():
        out, base = layer(x), layer.base_layer(x)
    assert out.dtype == base.dtype == torch.float32
    r = lambda t: t.to(torch.bfloat16).double()  # noqa: E731 - autocast's rounding of inputs
    ref = s * r(x) @ r(a).T @ r(b).T
    assert float(ref.abs().max() / base.abs().max()) < 2**-9  # under half a bf16 ulp
    err = float(((out - base).double() - ref).norm() / ref.norm())
    assert err < 0.02
    lost = float(((base.bfloat16() + ref.bfloat16()).double() - base.double() - ref).norm())
    assert lost > 0.5 * float(ref.norm())  # what a bf16 sum would have kept: little


def test_compiled_training_equals_eager():
    """train.compile runs the training forward through torch.compile (inductor, on the CPU
    here): the same updates and losses as eager fp32, across batches of different lengths."""
    from torch._dynamo.utils import counters

    data = lm_examples(8)
    cfg = dict(local_steps=3, batch_size=4, lr=1e-2, seed=2)
    runs = {}
    for compile_ in (False, True):
        host = llama_host()
        spec = ClientSpec("c", {m: 4 for m in host.module_names()})
        graphs = counters["stats"]["unique_graphs"]
        u = train_client(
            host, spec, Payload(None, None), data, TrainConfig(**cfg, compile=compile_)
        )
        compiled = counters["stats"]["unique_graphs"] - graphs
        assert (compiled > 0) == compile_  # the compiled path really ran (and only then)
        assert (host._compiled is not None) == compile_
        runs[compile_] = u
    eager, comp = runs[False], runs[True]
    for k in ("first_loss", "last_loss"):
        assert math.isclose(comp.extras[k], eager.extras[k], rel_tol=1e-5), k
    for m, f in eager.adapter.items():
        torch.testing.assert_close(comp.adapter[m].A, f.A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(comp.adapter[m].B, f.B, rtol=1e-4, atol=1e-6)
    with pytest.raises(FedLoraError, match="TrainConfig.compile must be a bool"):
        TrainConfig(compile="yes")
