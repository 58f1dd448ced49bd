"""Classifier heads as the papers train them, mean pooling, and bf16 encoders (issue 25).

* The default head of a BERT classifier is its pooler (dense + tanh) and classifier.
* ``model.pooling = "mean"`` pools the unpadded tokens: checked against a float64 numpy
  reference, and by padding: an example's logits do not change when a longer example pads it
  (an unmasked mean would).
* bf16 (autocast, bf16 weights) trains and evaluates an encoder classifier on any CPU; before,
  every client was dropped with "mixed dtype (CPU)" and evaluation raised from ``layer_norm``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.clients.models import default_modules_to_save, set_pooling
from fedlora.clients.tiny import build_tiny
from fedlora.core.contract import FedLoraError
from fedlora.engine import run_experiment
from fedlora.federation.config import ConfigError, load_config


def test_default_head_of_a_bert_classifier_includes_its_pooler():
    model, _ = build_tiny("tiny-bert", "classifier", 5)
    assert default_modules_to_save(model, "classifier") == ["classifier", "bert.pooler"]
    llama, _ = build_tiny("tiny-llama", "causal")
    assert default_modules_to_save(llama, "causal") == []


def test_mean_pooling_matches_a_float64_reference():
    torch.manual_seed(0)
    model, _ = build_tiny("tiny-bert", "classifier", 5)
    model.eval()
    set_pooling(model, "mean")
    rng = np.random.default_rng(1)
    ids = torch.tensor(rng.integers(5, 100, size=(3, 7)))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    seen = {}

    def keep(module, inputs, output):
        seen["h"] = output.last_hidden_state.detach()

    model.bert.encoder.register_forward_hook(keep)
    with torch.no_grad():
        pooled = model.bert(input_ids=ids, attention_mask=mask).pooler_output
    h = seen["h"].double().numpy()
    m = mask.double().numpy()[..., None]
    mean = (h * m).sum(1) / m.sum(1)
    w = model.bert.pooler.dense.weight.detach().double().numpy()
    b = model.bert.pooler.dense.bias.detach().double().numpy()
    ref = np.tanh(mean @ w.T + b)
    np.testing.assert_allclose(pooled.double().numpy(), ref, atol=1e-6)


def test_mean_pooling_ignores_padding():
    """The same example alone and padded beside a longer one gives the same logits; the
    unmasked mean (the attack on the mask) would not."""
    torch.manual_seed(0)
    model, _ = build_tiny("tiny-bert", "classifier", 5)
    model.eval()
    set_pooling(model, "mean")
    short = torch.tensor([[5, 17, 29]])
    long = torch.tensor([[5, 40, 41, 42, 43, 44]])
    batch = torch.tensor([[5, 17, 29, 0, 0, 0], long[0].tolist()])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])
    with torch.no_grad():
        alone = model(input_ids=short).logits[0]
        padded = model(input_ids=batch, attention_mask=mask).logits[0]
        unmasked = model(input_ids=batch).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    assert (unmasked - alone).abs().max() > 1e-4


def test_pooling_refused_where_it_cannot_apply():
    llama, _ = build_tiny("tiny-llama", "causal")
    with pytest.raises(FedLoraError, match="model.pooling = 'mean'.*no BERT-style pooler"):
        set_pooling(llama, "mean")
    with pytest.raises(ConfigError, match="model.pooling = 'mean': only for model.kind"):
        load_config("tiny", {"model.pooling": "mean"})
    with pytest.raises(ConfigError, match="model.pooling: 'max' is not one of"):
        load_config("lora_a2_paper", {"model.name": "tiny-bert", "model.pooling": "max"})


TINY_A2 = {
    "model.name": "tiny-bert",
    "rounds": 1,
    "clients_per_round": 2,
    "data.num_clients": 4,
    "train.epochs": "none",
    "train.local_steps": 1,
    "train.batch_size": 4,
    "eval.max_examples": 16,
    "eval.batch_size": 8,
    "threads": 1,
}


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_bf16_classifier_trains_and_evaluates(tmp_path, pooling):
    cfg = load_config(
        "lora_a2_paper",
        {**TINY_A2, "train.precision": "bf16", "model.pooling": pooling,
         "output_dir": str(tmp_path / "run")},
    )  # fmt: skip
    result = run_experiment(cfg, progress=False)
    assert not any(result.summary["dropped"].values()), result.summary["dropped"]
    final = result.summary["final"]["seen_clients"]
    assert np.isfinite(final["loss"]) and 0 <= final["accuracy"] <= 1
    # the head and the LayerNorms kept float32, the rest of the base in bf16
    assert result.summary["bytes_up"] > 0


@pytest.mark.parametrize(
    "preset", ["demo", "tiny", "lora_a2_paper", "flexlora_paper", "flora_paper"]
)
def test_auto_precision_safe_for_every_preset_on_a_bf16_cpu(tmp_path, monkeypatch, preset):
    """precision = "auto" picks bf16 on a CPU with bf16 units (forced here, so the test runs
    the bf16 path on any CPU): every preset's model kind trains one step without a drop."""
    import fedlora.clients.device as D

    monkeypatch.setattr(D, "native_bf16", lambda device: True)
    kind = load_config(preset).model.kind
    tiny = "tiny-bert" if kind == "classifier" else "tiny-llama"
    over = {"model.name": tiny, "train.precision": "auto", "model.dtype": "auto", "rounds": 1,
            "train.epochs": "none", "train.local_steps": 1, "train.batch_size": 2,
            "eval.max_examples": 8, "eval.max_generations": 2, "eval.max_new_tokens": 2,
            "eval.batch_size": 4, "clients_per_round": 2, "threads": 1,
            "output_dir": str(tmp_path / preset)}  # fmt: skip
    if preset in ("demo", "flexlora_paper", "flora_paper"):
        over["data.max_examples_per_client"] = 8
    cfg = load_config(preset, over)
    result = run_experiment(cfg, progress=False)
    assert not any(result.summary["dropped"].values()), result.summary["dropped"]
    for sets in result.summary["final"].values():
        assert np.isfinite(sets["loss"])
