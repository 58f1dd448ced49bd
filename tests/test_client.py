"""fedlora.clients.train: local training on tiny random models, and the strategies' client sides."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from tiny_models import llama_host, tiny_bert

from fedlora.clients.models import LoraHost, default_target_modules
from fedlora.clients.train import TrainConfig, train_client
from fedlora.core.contract import BOTH, ClientSpec, FedLoraError, LoraFactors, Payload
from fedlora.data import collate
from fedlora.strategies import get
from fedlora.strategies.hetlora import self_pruning_penalty


def lm_examples(n: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + i % 5
        ids = torch.randint(1, 128, (length,), generator=g).tolist()
        labels = [-100] * 2 + ids[2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def ranks_of(host: LoraHost, r: int = 4) -> dict[str, int]:
    return {m: r for m in host.module_names()}


CFG = TrainConfig(local_steps=12, batch_size=4, lr=1e-2, seed=1)


def test_train_config_validation_names_the_field():
    for field, value in [
        ("local_steps", 0),
        ("epochs", 0),
        ("batch_size", -1),
        ("lr", 0.0),
        ("b_lr_multiplier", float("nan")),
        ("weight_decay", -1.0),
        ("grad_clip", -0.5),
        ("max_length", 0),
        ("seed", 1.5),
    ]:
        with pytest.raises(FedLoraError, match=f"TrainConfig.{field}"):
            TrainConfig(**{field: value})
    with pytest.raises(FedLoraError, match="unknown"):
        TrainConfig.from_dict({"steps": 3})


def test_training_reduces_loss_and_reports_metrics():
    host = llama_host()
    spec = ClientSpec("c1", ranks_of(host))
    data = lm_examples()
    u = train_client(host, spec, Payload(None, None, seed=5), data, CFG)
    assert u.client_id == "c1" and u.num_examples == len(data)
    assert u.extras["steps"] == 12.0
    assert u.extras["last_loss"] < u.extras["first_loss"]
    for k in ("train_loss", "first_loss", "last_loss", "train_seconds"):
        assert isinstance(u.extras[k], float)
    # the loss on the fixed batch is lower with the trained adapter than with the initial one
    batch = {
        "input_ids": torch.tensor([d["input_ids"][:6] for d in data]),
        "labels": torch.tensor([d["labels"][:6] for d in data]),
    }
    with torch.no_grad():
        with host.use_global(None) as m:
            before = float(m(**batch).loss)
        after_delta = {
            m: LoraFactors(f.A, f.scaled_B(torch.float32), 1.0) for m, f in u.adapter.items()
        }
        with host.use_global(after_delta) as m:
            after = float(m(**batch).loss)
    assert after < before


def test_epochs_mode_counts_steps():
    host = llama_host()
    cfg = TrainConfig(epochs=2, batch_size=3, lr=1e-3)
    u = train_client(
        host, ClientSpec("c", ranks_of(host)), Payload(None, None), lm_examples(7), cfg
    )
    assert u.extras["steps"] == 2 * 3.0


@pytest.mark.parametrize("frozen", ["A", "B"])
def test_frozen_factor_is_bit_identical(frozen):
    host = llama_host()
    spec = ClientSpec("c", ranks_of(host))
    g = torch.Generator().manual_seed(3)
    adapter = {
        m: LoraFactors(
            torch.randn(4, d_in, generator=g) * 0.1,
            torch.randn(d_out, 4, generator=g) * 0.1,
            spec.scale(m),
        )
        for m, (d_out, d_in) in host.shapes().items()
    }
    trainable = frozenset({"A", "B"} - {frozen})
    cfg = TrainConfig(local_steps=3, lr=1e-2, weight_decay=0.1)
    u = train_client(host, spec, Payload(None, adapter, trainable), lm_examples(), cfg)
    other = "B" if frozen == "A" else "A"
    for m, f in adapter.items():
        assert torch.equal(getattr(u.adapter[m], frozen), getattr(f, frozen))
        assert not torch.equal(getattr(u.adapter[m], other), getattr(f, other))


def test_deterministic_for_fixed_seed_and_seed_matters():
    data = lm_examples()
    cfg = TrainConfig(local_steps=4, batch_size=3, lr=1e-2, seed=7)
    runs = []
    host = llama_host()
    spec = ClientSpec("c", ranks_of(host))
    for seed, h in [(7, host), (7, llama_host()), (8, host)]:
        c = TrainConfig(**{**cfg.__dict__, "seed": seed})
        runs.append(train_client(h, spec, Payload(None, None, seed=2), data, c))
    for m in runs[0].adapter:
        assert torch.equal(runs[0].adapter[m].A, runs[1].adapter[m].A)
        assert torch.equal(runs[0].adapter[m].B, runs[1].adapter[m].B)
    assert runs[0].extras["train_loss"] == runs[1].extras["train_loss"]
    assert runs[0].extras["train_loss"] != runs[2].extras["train_loss"]


def test_b_lr_multiplier_moves_b_further():
    host = llama_host()
    spec = ClientSpec("c", ranks_of(host))
    adapter0 = {
        m: LoraFactors(torch.randn(4, d_in) * 0.1, torch.randn(d_out, 4) * 0.1, spec.scale(m))
        for m, (d_out, d_in) in host.shapes().items()
    }
    moves = []
    for mult in (1.0, 16.0):
        cfg = TrainConfig(local_steps=2, lr=1e-3, b_lr_multiplier=mult, grad_clip=None)
        u = train_client(host, spec, Payload(None, adapter0), lm_examples(), cfg)
        moves.append(sum(float((u.adapter[m].B - f.B).norm()) for m, f in adapter0.items()))
    assert moves[1] > 4 * moves[0]


def test_sequence_classification():
    model = tiny_bert(0, 2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    host = LoraHost(model, default_target_modules(model) + ["classifier"])
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(8):
        label = i % 2
        ids = [1] + torch.randint(10 + 40 * label, 50 + 40 * label, (6,), generator=g).tolist()
        data.append({"input_ids": ids, "label": label})
    spec = ClientSpec("clf", {m: 4 for m in host.module_names()})
    batch = {
        "input_ids": torch.tensor([d["input_ids"] for d in data]),
        "labels": torch.tensor([d["label"] for d in data]),
    }

    def full_loss(delta):
        with torch.no_grad(), host.use_global(delta) as m:
            return float(m(**batch).loss)

    u = train_client(host, spec, Payload(None, None), data, TrainConfig(local_steps=20, lr=1e-2))
    delta = {m: LoraFactors(f.A, f.scaled_B(torch.float32), 1.0) for m, f in u.adapter.items()}
    assert full_loss(delta) < full_loss(None)
    assert "classifier" in u.adapter


def test_lora_a2_uploads_selected_slots_within_budget():
    host = llama_host()
    shapes = host.shapes()
    strategy = get("lora_a2", shapes=shapes, global_rank=8, seed=1)
    ranks = {m: (2 if "self_attn" in m else 3) for m in shapes}
    spec = ClientSpec("a2", ranks)
    for rnd in (1, 2):
        payload = strategy.configure(spec, rnd)
        budget = payload.extras["budget"]
        assert budget == sum(ranks.values())
        u = train_client(host, spec, payload, lm_examples(), TrainConfig(local_steps=3, lr=1e-2))
        slots = u.extras["slots"]
        assert set(slots) == set(u.adapter)
        assert 0 < sum(int(s.numel()) for s in slots.values()) <= budget
        frozen = "A" if payload.trainable == frozenset({"B"}) else "B"
        for m, idx in slots.items():
            full = payload.adapter[m]
            sent = u.adapter[m]
            assert sent.rank == idx.numel()
            ref = full.A[idx] if frozen == "A" else full.B[:, idx]
            assert torch.equal(getattr(sent, frozen), ref)
        strategy.aggregate(rnd, [u])


def test_hetlora_penalty_has_gradient_and_prunes():
    A = torch.randn(8, 10, requires_grad=True)
    B = torch.randn(6, 8, requires_grad=True)
    self_pruning_penalty(A, B, 0.5, 2.0).backward()
    assert A.grad[4:].abs().sum() > 0 and B.grad[:, 4:].abs().sum() > 0
    assert A.grad[:4].abs().sum() == 0

    host = llama_host()
    spec = ClientSpec("het", ranks_of(host, 8))
    g = torch.Generator().manual_seed(0)
    adapter = {
        m: LoraFactors(
            torch.randn(8, d_in, generator=g) * 0.1,
            torch.randn(d_out, 8, generator=g) * 0.1,
            spec.scale(m),
        )
        for m, (d_out, d_in) in host.shapes().items()
    }
    cfg = TrainConfig(local_steps=3, lr=1e-2)
    extras = {"hetlora": {"gamma": 0.75, "lambda": 1.0, "prev_tail_norms": {}}}
    first = train_client(
        host, spec, Payload(None, adapter, BOTH, extras=extras), lm_examples(), cfg
    )
    tails = first.extras["hetlora_tail_norms"]
    assert set(tails) == set(adapter) and first.extras["hetlora_penalty"] > 0
    assert all(f.rank == 8 for f in first.adapter.values())  # no previous norm: keep the rank
    # without the penalty the tail norms end higher: the penalty pulls the tail down
    no_pen = {"hetlora": {"gamma": 0.75, "lambda": 0.0, "prev_tail_norms": {}}}
    plain = train_client(
        host, spec, Payload(None, adapter, BOTH, extras=no_pen), lm_examples(), cfg
    )
    assert sum(tails.values()) < sum(plain.extras["hetlora_tail_norms"].values())
    # previous norms above the new ones -> the rank is pruned to floor(0.75 * 8) = 6
    m0, m1 = list(adapter)[:2]
    prev = {m0: tails[m0] * 10, m1: 0.0}
    extras = {"hetlora": {"gamma": 0.75, "lambda": 1.0, "prev_tail_norms": prev}}
    second = train_client(
        host, spec, Payload(None, adapter, BOTH, extras=extras), lm_examples(), cfg
    )
    assert second.adapter[m0].rank == 6 and second.adapter[m1].rank == 8
    full = host.read_adapter()[m0]
    assert torch.equal(second.adapter[m0].A, full.A[:6])
    assert torch.equal(second.adapter[m0].B, full.B[:, :6])


def test_errors():
    host = llama_host()
    spec = ClientSpec("c", ranks_of(host))
    with pytest.raises(FedLoraError, match="client c: no training examples"):
        train_client(host, spec, Payload(None, None), [], CFG)
    with pytest.raises(FedLoraError, match="no tokenizer"):
        train_client(host, spec, Payload(None, None), [{"text": "x"}], CFG)
    with pytest.raises(FedLoraError, match="nothing to train"):
        train_client(host, spec, Payload(None, None, frozenset()), lm_examples(), CFG)


def test_raw_examples_with_tokenizer():
    from fedlora.data import Example

    class Tok:  # a minimal duck-typed tokenizer: characters -> ids
        pad_token_id = 0
        eos_token_id = 1
        bos_token_id = 2
        chat_template = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + (ord(c) % 120) for c in text]}

    host = llama_host()
    data = [Example("t", "say hi", "", "hi there"), Example("t", "say yo", "", "yo")]
    u = train_client(
        host,
        ClientSpec("c", ranks_of(host)),
        Payload(None, None),
        data,
        TrainConfig(local_steps=2, max_length=32),
        Tok(),
    )
    assert u.num_examples == 2 and u.extras["steps"] == 2.0


def _clf_data(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(n):
        label = i % 3
        ids = [1] + torch.randint(10 + 30 * label, 40 + 30 * label, (6,), generator=g).tolist()
        data.append({"input_ids": ids, "label": label})
    return data


def test_classifier_head_is_trained_federated_and_can_stay_frozen():
    model = tiny_bert(0, 3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    init = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    host = LoraHost(model, default_target_modules(model), modules_to_save=["classifier"])
    spec = ClientSpec("clf", {m: 2 for m in host.module_names()})
    data = _clf_data()
    batch = {
        "input_ids": torch.tensor([d["input_ids"] for d in data]),
        "labels": torch.tensor([d["label"] for d in data]),
    }
    cfg = TrainConfig(local_steps=20, lr=1e-2)
    u = train_client(host, spec, Payload(None, None), data, cfg)
    assert set(u.dense) == {"classifier.weight", "classifier.bias"}
    assert not torch.equal(u.dense["classifier.weight"], init["weight"])  # the head moved
    delta = {m: LoraFactors(f.A, f.scaled_B(torch.float32), 1.0) for m, f in u.adapter.items()}

    def loss(delta, dense):
        with torch.no_grad(), host.use_global(delta, dense) as m:
            return float(m(**batch).loss)

    # the trained head is part of what was learnt: the LoRA delta alone, on the initial
    # head, does worse
    assert loss(delta, u.dense) < loss(delta, None)
    assert loss(delta, u.dense) < loss(None, None)
    # stateless: a payload without dense tensors starts from the original head again, and one
    # with them starts from those (the global head)
    host.prepare(spec, Payload(None, None))
    assert torch.equal(host.model.classifier.weight, init["weight"])
    host.prepare(spec, Payload(None, None, dense=u.dense))
    assert torch.equal(host.model.classifier.weight, u.dense["classifier.weight"])
    with pytest.raises(FedLoraError, match="client clf: dense tensor 'nope.weight' is not"):
        host.prepare(spec, Payload(None, None, dense={"nope.weight": torch.zeros(1)}))

    fresh = tiny_bert(0, 3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    frozen = LoraHost(fresh, default_target_modules(fresh))
    v = train_client(frozen, spec, Payload(None, None), data, cfg)
    assert v.dense == {}
    assert torch.equal(frozen.model.classifier.weight, init["weight"])


def test_lora_a2_masked_training_picks_slots_from_the_first_gradient_and_trains_only_them():
    host = llama_host()
    shapes = host.shapes()
    strategy = get("lora_a2", shapes=shapes, global_rank=4, seed=1)
    spec = ClientSpec("a2", {m: 1 for m in shapes})
    data = lm_examples(4)
    cfg = TrainConfig(local_steps=3, batch_size=4, lr=1e-2, weight_decay=0.1)
    p1 = strategy.configure(spec, 1)
    u1 = train_client(host, spec, p1, data, cfg)
    strategy.aggregate(1, [u1])
    payload = strategy.configure(spec, 3)  # B trained, and nonzero after round 1's... A round
    assert payload.extras["masked_training"] is True
    # reference importance: ||grad B[:, i]|| * ||A[i]|| * scale on the first batch (the whole
    # data here; the causal-LM loss is a token mean, so the order does not matter)
    host.prepare(spec, payload)
    host.model(**collate(data, 0)).loss.backward()
    scores = []
    for m, (a, b, s) in host.lora_weights().items():
        for i in range(4):
            score = float(b.grad[:, i].double().norm() * a[i].double().norm() * s)
            scores.append((score, m, i))
    top = {(m, i) for _, m, i in sorted(scores, reverse=True)[: payload.extras["budget"]]}
    u = train_client(host, spec, payload, data, cfg)
    assert {(m, int(i)) for m, idx in u.extras["slots"].items() for i in idx} == top
    trained = host.read_adapter()
    for m, f in payload.adapter.items():
        chosen = u.extras["slots"].get(m, torch.zeros(0, dtype=torch.long))
        rest = [i for i in range(4) if i not in set(chosen.tolist())]
        assert torch.equal(trained[m].B[:, rest], f.B[:, rest])  # untouched, decay included
        assert torch.equal(trained[m].A, f.A)  # frozen this round
    moved = [m for m, idx in u.extras["slots"].items() if len(idx)]
    assert any(not torch.equal(trained[m].B, payload.adapter[m].B) for m in moved)


def test_lora_a2_per_module_selection_probes_each_modules_slots_from_the_first_gradient():
    """``selection="per_module"``: every module gets exactly its rank's worth of slots, each the
    module's top by the first gradient's importance (numpy reference), the others untouched."""
    host = llama_host()
    shapes = host.shapes()
    strategy = get("lora_a2", shapes=shapes, global_rank=4, seed=3, selection="per_module")
    ranks = {m: 1 + i % 2 for i, m in enumerate(sorted(shapes))}
    spec = ClientSpec("pm", ranks)
    data = lm_examples(4)
    cfg = TrainConfig(local_steps=3, batch_size=4, lr=1e-2, weight_decay=0.1)
    strategy.aggregate(1, [train_client(host, spec, strategy.configure(spec, 1), data, cfg)])
    payload = strategy.configure(spec, 3)  # B trained, A nonzero: every slot has a gradient
    assert payload.extras["budget"] == ranks
    host.prepare(spec, payload)
    host.model(**collate(data, 0)).loss.backward()
    top = set()
    for m, (a, b, s) in host.lora_weights().items():
        score = [float(b.grad[:, i].double().norm() * a[i].double().norm() * s) for i in range(4)]
        top |= {(m, int(i)) for i in np.argsort(score)[::-1][: ranks[m]]}
    u = train_client(host, spec, payload, data, cfg)
    assert {(m, int(i)) for m, idx in u.extras["slots"].items() for i in idx} == top
    assert {m: len(idx) for m, idx in u.extras["slots"].items()} == ranks
    trained = host.read_adapter()
    for m, f in payload.adapter.items():
        rest = [i for i in range(4) if (m, i) not in top]
        assert torch.equal(trained[m].B[:, rest], f.B[:, rest])
    strategy.aggregate(3, [u])  # the server accepts it against each module's budget


def test_lora_a2_without_alternating_freeze_masks_both_factors_to_the_probed_slots():
    """The ablation trains A and B: its slots come from the first gradient's change of each
    slot's outer product (numpy reference), and the unselected slots of both factors stay
    bit-identical while the selected ones move in both."""
    host = llama_host()
    shapes = host.shapes()
    strategy = get("lora_a2", shapes=shapes, global_rank=4, seed=2, alternating_freeze=False)
    spec = ClientSpec("nf", {m: 1 for m in shapes})
    data = lm_examples(4)
    cfg = TrainConfig(local_steps=3, batch_size=4, lr=1e-2, weight_decay=0.1)
    strategy.aggregate(1, [train_client(host, spec, strategy.configure(spec, 1), data, cfg)])
    payload = strategy.configure(spec, 2)  # B is nonzero on round 1's slots: A has a gradient
    assert payload.trainable == {"A", "B"}
    host.prepare(spec, payload)
    host.model(**collate(data, 0)).loss.backward()
    scores = []
    for m, (a, b, s) in host.lora_weights().items():
        A, B = a.detach().double().numpy(), b.detach().double().numpy()
        dA, dB = -a.grad.double().numpy(), -b.grad.double().numpy()
        for i in range(4):
            change = np.outer(B[:, i] + dB[:, i], A[i] + dA[i]) - np.outer(B[:, i], A[i])
            scores.append((s * np.linalg.norm(change), m, i))
    top = {(m, i) for _, m, i in sorted(scores, reverse=True)[: payload.extras["budget"]]}
    u = train_client(host, spec, payload, data, cfg)
    assert {(m, int(i)) for m, idx in u.extras["slots"].items() for i in idx} == top
    trained = host.read_adapter()
    moved_a = moved_b = False
    for m, f in payload.adapter.items():
        chosen = set(u.extras["slots"].get(m, torch.zeros(0, dtype=torch.long)).tolist())
        rest = [i for i in range(4) if i not in chosen]
        assert torch.equal(trained[m].B[:, rest], f.B[:, rest])
        assert torch.equal(trained[m].A[rest], f.A[rest])
        picked = sorted(chosen)
        moved_a |= not torch.equal(trained[m].A[picked], f.A[picked])
        moved_b |= not torch.equal(trained[m].B[:, picked], f.B[:, picked])
    assert moved_a and moved_b
