"""Local DP-SGD (`fedlora.clients.dp_sgd`) on tiny models, and DP runs end to end: per-example
gradients against a per-example loop, the noise of a step, reproducibility and exact resume."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from tiny_models import llama_host, tiny_bert

import fedlora.federation.checkpoint as ckpt
from fedlora import ClientSpec, Payload
from fedlora.clients.dp_sgd import DPSGD, per_example_loss, poisson_batches
from fedlora.clients.models import LoraHost, default_target_modules
from fedlora.clients.train import TrainConfig, train_client
from fedlora.core.accounting import epsilon
from fedlora.core.privacy import LocalDP
from fedlora.engine import RunStopped, deterministic, run_experiment
from fedlora.federation.config import load_preset


def _llama_batch(n=4):
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        ids = torch.randint(1, 128, (5 + 2 * i,), generator=g).tolist()
        labels = [-100] * 2 + ids[2:]  # a prompt that is not scored
        out.append({"input_ids": ids, "labels": labels})
    return out


def _prepared(host, trainable, seed=3):
    spec = ClientSpec("0", {m: 3 for m in host.module_names()}, alpha=8.0)
    model = host.prepare(spec, Payload(None, None, frozenset(trainable), seed=seed))
    with torch.no_grad():  # B = 0 would give A no gradient
        for _, b, _ in host.lora_weights().values():
            b.copy_(0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(1)))
    return model


def _loop_grads(model, params, examples):
    """Reference: each example alone through the plain model, its own loss backpropagated."""
    from fedlora.data import collate

    out = []
    for ex in examples:
        model.zero_grad(set_to_none=True)
        batch = collate([ex], 0)
        labels = batch.pop("labels")
        per_example_loss(model(**batch).logits, labels).sum().backward()
        out.append([p.grad.detach().clone() for p in params])
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("trainable", ["AB", "B", "A"])
def test_per_example_gradients_match_a_per_example_loop_on_tiny_llama(trainable):
    host = llama_host()
    model = _prepared(host, trainable)
    a, b = host.trainable_parameters()
    params = a + b
    frozen = [p for p in model.parameters() if not p.requires_grad]
    examples = _llama_batch()
    ref = _loop_grads(model, params, examples)
    opt = torch.optim.SGD(params, lr=0.0)

    def hooks():  # the host's own (fedlora.clients.device.float32_outputs) are there throughout
        return [(n, list(m._forward_hooks.values()), list(m._backward_hooks.values()))
                for n, m in model.named_modules()]  # fmt: skip

    before = hooks()
    with DPSGD(model, opt, LocalDP(1.0, 0.0), len(examples), secret=0) as dp:
        dp.grad_samples(examples, pad_id=0)
        assert hooks() != before  # Opacus's hooks are in place
        for j, p in enumerate(params):
            assert p.grad_sample.shape == (len(examples), *p.shape)
            for i in range(len(examples)):
                want = ref[i][j]
                assert (p.grad_sample[i] - want).abs().max() <= 1e-5 * (1 + want.abs().max())
        # frozen factors (FFA-LoRA's A, LoRA-A2's frozen one) and the base get none
        assert all(getattr(p, "grad_sample", None) is None for p in frozen)
        assert len(params) == len(host.module_names()) * len(trainable)
    # Opacus's hooks are gone: the host's model serves the next client unchanged
    assert hooks() == before


def test_per_example_gradients_match_a_per_example_loop_on_tiny_bert_classifier():
    model = tiny_bert(num_labels=3)
    host = LoraHost(model, default_target_modules(model))
    _prepared(host, "AB")
    params = [p for pp in host.trainable_parameters() for p in pp]
    g = torch.Generator().manual_seed(2)
    examples = [
        {"input_ids": torch.randint(1, 100, (4 + i,), generator=g).tolist(), "labels": i % 3}
        for i in range(3)
    ]
    ref = _loop_grads(host.model, params, examples)
    with DPSGD(host.model, torch.optim.SGD(params, lr=0.0), LocalDP(1.0, 0.0), 3, 0) as dp:
        dp.grad_samples(examples, pad_id=0)
        for j, p in enumerate(params):
            for i in range(3):
                want = ref[i][j]
                assert (p.grad_sample[i] - want).abs().max() <= 1e-5 * (1 + want.abs().max())


def test_a_dp_sgd_step_clips_each_example_and_adds_noise_of_the_mechanism_std():
    host = llama_host()
    model = _prepared(host, "AB")
    params = [p for pp in host.trainable_parameters() for p in pp]
    examples = _llama_batch(3)
    clip, sigma, bs = 1e-3, 0.0, 4  # a tiny clip binds on every example
    ref = _loop_grads(model, params, examples)
    want = [
        sum(g[j] * min(1.0, clip / math.sqrt(sum(float((x**2).sum()) for x in g))) for g in ref)
        / bs
        for j in range(len(params))
    ]
    before = [p.detach().clone() for p in params]
    lr = 1e3  # a step far above float32 rounding of the weights
    assert all(math.sqrt(sum(float((x**2).sum()) for x in g)) > 10 * clip for g in ref)
    with DPSGD(model, torch.optim.SGD(params, lr=lr), LocalDP(clip, sigma), bs, 0) as dp:
        dp.step(examples, pad_id=0)
    for p, p0, w in zip(params, before, want):
        assert torch.allclose((p0 - p.detach()) / lr, w, atol=1e-9, rtol=1e-3)
    # an empty Poisson batch: the step is the noise alone, std sigma * clip / expected batch
    sigma, clip = 2.0, 0.5
    before = torch.cat([p.detach().flatten().clone() for p in params])
    with DPSGD(model, torch.optim.SGD(params, lr=1.0), LocalDP(clip, sigma), bs, 7) as dp:
        dp.step([], pad_id=0)
    moved = before - torch.cat([p.detach().flatten() for p in params])
    assert moved.numel() > 3000  # std estimated to ~1.3%
    assert moved.std().item() == pytest.approx(sigma * clip / bs, rel=0.05)


def test_dp_sgd_noise_depends_on_every_bit_of_the_clients_secret():
    """Torch's CPU generator keeps the low 32 bits of a seed: unprotected, secrets differing
    only above bit 32 gave the same DP-SGD noise, so a 2^32 search regenerated it. Keyed by
    the whole secret, they differ (and one secret gives one stream: a resumed client)."""
    host = llama_host()
    model = _prepared(host, "AB")
    params = [p for pp in host.trainable_parameters() for p in pp]

    def noise(secret):
        before = torch.cat([p.detach().flatten().clone() for p in params])
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
        with DPSGD(model, torch.optim.SGD(params, lr=1.0), LocalDP(0.5, 2.0), 4, secret) as dp:
            dp.step([], pad_id=0)
        moved = before - torch.cat([p.detach().flatten() for p in params])
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        return moved

    low = 0x12345678
    assert torch.equal(noise(low), noise(low))
    for high in (low + (0x5A5A5A5A << 32), low + (1 << 100)):
        assert not torch.equal(noise(low), noise(high))


def test_poisson_batches_sample_each_example_at_the_rate():
    sizes = [len(b) for b in poisson_batches(50, 0.2, 2000, 2**100 + 3, "0", 1)]
    assert sum(sizes) / len(sizes) == pytest.approx(10, rel=0.03)
    assert min(sizes) < 10 < max(sizes)


def test_the_server_cannot_replay_a_clients_dp_sgd_without_its_secret():
    """The attack: the server holds a client's inputs (data, payload, round) and the public
    configuration, and reruns its DP-SGD to strip the noise. With the client's own secret
    (drawn from its OS, never sent) the replay differs from the upload; with seeded noise
    (the unprotected path, `seeded=True`) it matches bit for bit. The frozen A stays
    bit-identical either way, and no raw loss leaves the client."""
    host = llama_host()
    spec = ClientSpec("0", {m: 2 for m in host.module_names()}, alpha=8.0)
    data = _llama_batch(8)
    cfg = TrainConfig(local_steps=3, batch_size=2)

    def upload(privacy):
        payload = Payload(None, None, frozenset({"B"}), seed=4)
        start = host.prepare(spec, payload) and host.read_adapter()
        u = train_client(host, spec, payload, data, cfg, server_round=2, privacy=privacy)
        for m, f in u.adapter.items():
            assert torch.equal(f.A, start[m].A)  # frozen A stays bit-identical
        return u

    def same(a, b):
        return all(torch.equal(a.adapter[m].B, b.adapter[m].B) for m in a.adapter)

    sent, replay = upload(LocalDP(0.5, 1.0)), upload(LocalDP(0.5, 1.0))
    assert not same(sent, replay)
    assert same(upload(LocalDP(0.5, 1.0, secret=7)), upload(LocalDP(0.5, 1.0, secret=7)))
    assert same(upload(LocalDP(0.5, 1.0, seeded=True)), upload(LocalDP(0.5, 1.0, seeded=True)))
    assert sent.extras["dp_steps"] == 3 and sent.extras["dp_sample_rate"] == 0.25
    assert sent.extras["dp_noise_multiplier"] == 1.0
    assert not {"train_loss", "first_loss", "last_loss", "train_seconds"} & set(sent.extras)


# -- runs --------------------------------------------------------------------------------------


def _cfg(out, mode, name="zero_pad", **extra):
    return load_preset(
        "tiny",
        {
            "output_dir": str(out),
            "rounds": 2,
            "strategy.name": name,
            "privacy.mode": mode,
            "privacy.clip_norm": 0.5,
            "privacy.noise_multiplier": 1.0,
            "eval.metrics": ["loss"],
            "eval.max_examples": 4,
            **extra,
        },
    )


A2_LOCAL = {"strategy.options": {"masked_training": False}}


@pytest.mark.parametrize("mode, name", [("central", "flexlora"), ("local", "lora_a2")])
def test_dp_run_draws_secret_noise_and_resumes_exactly(tmp_path, mode, name):
    """Two runs of one configuration release different noise (the server's and the clients'
    secrets come from the OS); a run cut after round 1 and resumed twice from the same
    checkpoint gives the same result both times (the secrets are in the checkpoint); with
    ``privacy.insecure_seeded_noise`` two runs are identical, and the summary says it is
    not private."""
    extra = A2_LOCAL if name == "lora_a2" else {}
    a = run_experiment(_cfg(tmp_path / "a", mode, name, **extra), progress=False, save_final=False)
    b = run_experiment(_cfg(tmp_path / "b", mode, name, **extra), progress=False, save_final=False)
    assert any(
        not torch.equal(f.delta(), b.strategy.global_delta()[m].delta())
        for m, f in a.strategy.global_delta().items()
    )
    eps = [r["epsilon"] for r in a.round_rows()]
    assert all(math.isfinite(e) and e > 0 for e in eps) and eps == sorted(eps)
    assert a.summary["privacy"]["epsilon"] == eps[-1] and a.summary["privacy"]["private"]

    def stop(rnd, result):
        if rnd == 1:
            raise RunStopped("cut")

    cut = _cfg(tmp_path / "c", mode, name, **extra)
    with pytest.raises(RunStopped):
        run_experiment(cut, progress=False, on_round_end=stop, save_final=False)
    assert ckpt.load_checkpoint(tmp_path / "c")["privacy"]["secret"]
    shutil.copytree(tmp_path / "c", tmp_path / "d")
    resumed = [
        run_experiment(dataclasses.replace(cut, output_dir=str(tmp_path / d)), resume=True,
                       progress=False, save_final=False)
        for d in ("c", "d")
    ]  # fmt: skip
    rows = [[deterministic(r) for r in res.rows] for res in resumed]
    assert rows[0] == rows[1]
    for m, f in resumed[0].strategy.global_delta().items():
        assert torch.equal(f.delta(), resumed[1].strategy.global_delta()[m].delta())
    seeded = {**extra, "privacy.insecure_seeded_noise": True}
    s1 = run_experiment(_cfg(tmp_path / "s1", mode, name, **seeded), progress=False)
    s2 = run_experiment(_cfg(tmp_path / "s2", mode, name, **seeded), progress=False)
    assert [deterministic(r) for r in s1.rows] == [deterministic(r) for r in s2.rows]
    summary = json.loads((tmp_path / "s1" / "summary.json").read_text())
    assert summary["privacy"]["mode"] == mode and summary["privacy"]["private"] is False


def test_central_epsilon_is_the_accountants_over_the_rounds(tmp_path):
    r = run_experiment(_cfg(tmp_path, "central"), progress=False, save_final=False)
    p = r.summary["privacy"]
    q = 3 / 6  # clients_per_round / training clients of the tiny preset
    assert p["client_sampling_rate"] == q and p["delta"] == pytest.approx(1 / 60)
    assert p["epsilon"] == pytest.approx(epsilon([(1.0, q, 2)], 1 / 60))


@pytest.mark.parametrize("mode", ["central", "local"])
def test_cli_runs_the_tiny_preset_with_privacy_and_reports_a_finite_epsilon(tmp_path, mode):
    from fedlora.cli import commands as cli
    from fedlora.cli.report import format_table, load_run, summary_rows

    out = tmp_path / mode
    argv = ["run", "--preset", "tiny", "--rounds", "2", "--set", f"privacy.mode={mode}"]
    argv += ["--set", "privacy.clip_norm=0.5", "--set", "privacy.noise_multiplier=1.0"]
    argv += ["--set", f"output_dir={out}", "--set", "eval.metrics=loss", "--quiet"]
    if mode == "local":  # local epsilon counts sent clients; Poisson may send none (1/4096)
        argv += ["--set", "privacy.sampling=fixed"]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["privacy"]["epsilon"] < math.inf
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epsilon"] for r in rows if r["kind"] == "round"][-1] == summary["privacy"]["epsilon"]
    (row,) = summary_rows([load_run(out)])  # what `fedlora compare` tabulates
    assert row["epsilon"] == summary["privacy"]["epsilon"]
    assert "epsilon" in format_table([row]).splitlines()[0]
