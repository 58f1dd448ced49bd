"""fedlora.clients.evaluate: metrics against hand-computed and float64 references on tiny models."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fedlora.clients.evaluate import accuracy, evaluate, evaluate_detailed, macro_f1, rouge_l
from fedlora.clients.tiny import build_tiny
from fedlora.data import Example, encode_example


def test_rouge_l_identical_and_disjoint():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l(["alpha beta gamma"], ["delta epsilon"]) == 0.0
    mixed = rouge_l(["the cat", "dog"], ["the cat", "bird"])
    assert mixed == pytest.approx(0.5)


def test_accuracy_and_macro_f1_hand_computed():
    t = ["a", "a", "b", "b", "c"]
    p = ["a", "b", "b", "b", "a"]
    assert accuracy(t, p) == pytest.approx(3 / 5)
    # a: tp1 fp1 fn1 -> 0.5 ; b: tp2 fp1 fn0 -> 0.8 ; c: tp0 fp0 fn1 -> 0
    assert macro_f1(t, p) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1(["x"], ["x"]) == 1.0


@pytest.fixture(scope="module")
def tiny_llama():
    return build_tiny("tiny-llama")


EXAMPLES = [
    Example("gen", "Say hello.", "", "hello there"),
    Example("gen", "Repeat the word.", "banana", "banana"),
    Example("gen", "Count.", "one two", "three four five"),
    Example("cls", "Sentiment?", "great film", "positive", "positive"),
    Example("cls", "Sentiment?", "awful", "negative", "negative"),
]


def _reference_loss(model, tokenizer, examples, max_length) -> float:
    """Token-weighted mean response NLL, one unpadded example at a time, in float64."""
    m = copy.deepcopy(model).double()
    nll, n = 0.0, 0
    for e in examples:
        enc = encode_example(tokenizer, e, max_length)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logits = m(input_ids=ids).logits[0].numpy()
        labels = np.array(enc["labels"])
        for t in range(len(labels) - 1):
            y = labels[t + 1]
            if y == -100:
                continue
            row = logits[t]
            lse = row.max() + math.log(np.exp(row - row.max()).sum())
            nll += lse - row[y]
            n += 1
    return nll / n


def test_loss_matches_float64_reference(tiny_llama):
    model, tok = tiny_llama
    out = evaluate(model, tok, EXAMPLES, ("loss", "perplexity"), batch_size=2, max_length=48)
    ref = _reference_loss(model, tok, EXAMPLES, 48)
    assert out["loss"] == pytest.approx(ref, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    n_tok = sum(sum(1 for y in encode_example(tok, e, 48)["labels"] if y != -100) for e in EXAMPLES)
    assert out["n_tokens"] == n_tok
    # batching and padding must not change the result
    one = evaluate(model, tok, EXAMPLES, ("loss",), batch_size=5, max_length=48)
    assert one["loss"] == pytest.approx(out["loss"], rel=1e-6)


def test_bf16_evaluation_tracks_the_float64_loss_and_generates_with_the_kv_cache(
    tiny_llama, monkeypatch
):
    model, tok = tiny_llama
    calls = []
    original = type(model).generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("use_cache"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    out = evaluate(
        model, tok, EXAMPLES, ("loss", "rouge_l"), batch_size=2, max_new_tokens=3,
        max_length=48, precision="bf16",
    )  # fmt: skip
    ref = _reference_loss(model, tok, EXAMPLES, 48)
    assert out["loss"] == pytest.approx(ref, rel=1e-2)  # bf16 rounding, still close
    assert out["loss"] != pytest.approx(ref, rel=1e-6)  # ... and bf16 did run
    assert calls and all(c is True for c in calls)


def test_generation_and_constrained_classification(tiny_llama):
    model, tok = tiny_llama
    out = evaluate(
        model, tok, EXAMPLES, ("loss", "rouge_l", "accuracy", "f1"),
        batch_size=2, max_new_tokens=4, max_length=48, per_task=True,
    )  # fmt: skip
    assert out["n_generation"] == 3 and out["n_classification"] == 2
    assert 0.0 <= out["rouge_l"] <= 1.0
    assert out["accuracy"] in (0.0, 0.5, 1.0)
    assert "gen/loss" in out and "cls/accuracy" in out and "gen/accuracy" not in out


def test_constrained_generation_picks_the_likeliest_label(tiny_llama):
    model, tok = tiny_llama
    e = Example("cls", "Sentiment?", "great film", "positive", "positive")
    labels = {"cls": ["positive", "negative", "meh"]}
    out = evaluate(model, tok, [e], ("accuracy",), labels=labels, max_length=48)
    # the reference: the label with the highest summed response log-likelihood
    scores = {}
    for lab in labels["cls"]:
        enc = encode_example(tok, Example("cls", e.instruction, e.input, lab, lab), 48)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        scores[lab] = sum(float(logp[t, y]) for t, y in enumerate(enc["labels"][1:]) if y != -100)
    best = max(scores, key=scores.get)
    assert out["accuracy"] == (1.0 if best == "positive" else 0.0)


def test_encoder_classifier_argmax_and_loss():
    model, tok = build_tiny("tiny-bert", "classifier", num_labels=2)
    ex = [
        Example("s", "Sentiment?", "good", "positive", "positive"),
        Example("s", "Sentiment?", "bad", "negative", "negative"),
        Example("s", "Sentiment?", "fine", "positive", "positive"),
    ]
    l2i = {"negative": 0, "positive": 1}
    out = evaluate(model, tok, ex, ("loss", "accuracy", "f1"), label_to_id=l2i, batch_size=2)
    preds, nll = [], []
    for e in ex:
        enc = tok(e.instruction, e.input, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0].double()
        preds.append(["negative", "positive"][int(logits.argmax())])
        nll.append(float(-torch.log_softmax(logits, -1)[l2i[e.label]]))
    truth = [e.label for e in ex]
    assert out["accuracy"] == pytest.approx(accuracy(truth, preds))
    assert out["f1"] == pytest.approx(macro_f1(truth, preds))
    assert out["loss"] == pytest.approx(sum(nll) / 3, rel=1e-5)


def test_unknown_metric_raises(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="rouge"):
        evaluate(model, tok, EXAMPLES, ("rouge",))


def test_per_example_values_reproduce_every_metric(tiny_llama):
    model, tok = tiny_llama
    ev = evaluate_detailed(
        model, tok, EXAMPLES, ("loss", "rouge_l", "accuracy", "f1"),
        batch_size=2, max_new_tokens=4, max_length=48, per_task=True, n_boot=200,
    )  # fmt: skip
    cols, out = ev.examples, ev.metrics
    assert cols["task"] == [e.task for e in EXAMPLES]
    # each example's summed response NLL, against the float64 reference one at a time
    for i, e in enumerate(EXAMPLES):
        ref = _reference_loss(model, tok, [e], 48)
        assert cols["nll"][i] / cols["ntok"][i] == pytest.approx(ref, rel=1e-5)
    assert out["loss"] == pytest.approx(sum(cols["nll"]) / sum(cols["ntok"]), rel=1e-12)
    gen = [i for i, e in enumerate(EXAMPLES) if e.label is None]
    assert [cols["rouge_l"][i] is not None for i in range(5)] == [e.label is None for e in EXAMPLES]
    assert out["rouge_l"] == pytest.approx(np.mean([cols["rouge_l"][i] for i in gen]))
    cls = [i for i, e in enumerate(EXAMPLES) if e.label is not None]
    assert [cols["label"][i] for i in cls] == [EXAMPLES[i].label for i in cls]
    truth, pred = [cols["label"][i] for i in cls], [cols["pred"][i] for i in cls]
    assert out["accuracy"] == pytest.approx(accuracy(truth, pred))
    # every metric, per task too, has a CI that brackets it
    for key in ("loss", "rouge_l", "accuracy", "f1", "gen/loss", "cls/accuracy"):
        lo, hi = out[f"{key}_ci95"]
        assert lo <= out[key] + 1e-12 and out[key] <= hi + 1e-12, key
    lo, hi = out["loss_ci95"]
    assert hi > lo  # five different examples: the resampled loss varies
    assert "loss_ci95" not in evaluate(model, tok, EXAMPLES, ("loss",), max_length=48)


def test_rouge_l_on_a_sample_of_the_generation_examples(tiny_llama):
    model, tok = tiny_llama
    ev = evaluate_detailed(
        model, tok, EXAMPLES, ("loss", "rouge_l"), max_new_tokens=4, max_length=48,
        max_generations=2,
    )  # fmt: skip
    scored = [i for i, v in enumerate(ev.examples["rouge_l"]) if v is not None]
    assert scored == [0, 1]  # evenly spread over the three generation examples
    assert ev.metrics["n_generation"] == 2
    assert len([v for v in ev.examples["nll"] if v is not None]) == 5  # loss on all
