"""Evaluation of a (global) model on held-out examples.

`evaluate` computes, over `fedlora.data.Example` records:

* ``loss`` / ``perplexity`` (causal LM): the token-weighted mean cross-entropy over response
  tokens (the prompt is masked as in training), and its exponential. For an encoder
  classifier ``loss`` is the mean cross-entropy of the class logits.
* ``rouge_l``: Rouge-L F1 (`rouge_score`, offline) of batched greedy generations (left
  padding) against the references, on generation examples (``label`` is None).
* ``accuracy`` / ``f1`` (macro-F1 over the classes seen in references or predictions), on
  classification examples: argmax of an encoder's logits, or for a causal LM constrained
  generation over the task's label set (the label whose response tokens have the highest
  log-likelihood given the prompt).

With ``per_task=True`` the same metrics are also reported per task as ``"{task}/{metric}"``.
Counts come back as ``n_examples``, ``n_tokens``, ``n_generation``, ``n_classification``.

`evaluate_detailed` also returns the per-example values (`example_columns`: task, summed
response NLL and token count, Rouge-L, true and predicted label) and, with ``n_boot > 0``, a
95% bootstrap CI over examples of every metric as ``"{metric}_ci95": [low, high]``. Each metric
is computed from per-example terms (`metric_terms`) in the form `fedlora.core.stats` resamples, so
the point value, its CI and the paired tests of `fedlora compare` share one definition.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedlora.clients.device import Amp, model_device
from fedlora.core.stats import Finish, bootstrap_ci, ratio

METRICS = ("loss", "perplexity", "rouge_l", "accuracy", "f1")
IGNORE_INDEX = -100


# -- pure metrics ---------------------------------------------------------------------------

_SCORER: Any = None


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Rouge-L F1 (``rouge_score``, stemming on) of each prediction against its reference."""
    global _SCORER
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [_SCORER.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean Rouge-L F1 (``rouge_score``, stemming on) of predictions against references."""
    scores = rouge_l_scores(predictions, references)
    return float(sum(scores) / len(scores)) if scores else float("nan")


def accuracy(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_pred)} predictions for {len(y_true)} references")
    if not y_true:
        return float("nan")
    return float(ratio(_accuracy_terms(y_true, y_pred).sum(0)))


def macro_f1(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Unweighted mean of per-class F1 over the classes in references or predictions
    (a class never predicted nor present scores nothing; 0/0 counts as 0, as in sklearn)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_pred)} predictions for {len(y_true)} references")
    if not y_true:
        return float("nan")
    return float(_macro_f1_finish(_f1_terms(y_true, y_pred).sum(0)))


# -- per-example terms of each metric (see fedlora.core.stats) ------------------------------------


def _accuracy_terms(y_true: Sequence[Any], y_pred: Sequence[Any]) -> np.ndarray:
    return np.array([[float(t == p), 1.0] for t, p in zip(y_true, y_pred)]).reshape(-1, 2)


def _f1_terms(y_true, y_pred, classes: Sequence[Any] | None = None) -> np.ndarray:
    """Per example and class c: (tp_c, fp_c, fn_c) indicators, classes in sorted order."""
    if classes is None:
        classes = sorted(set(y_true) | set(y_pred), key=str)
    t = np.array([str(x) for x in y_true], dtype=object)[:, None]
    p = np.array([str(x) for x in y_pred], dtype=object)[:, None]
    c = np.array([str(x) for x in classes], dtype=object)[None, :]
    tp, fp, fn = (t == c) & (p == c), (t != c) & (p == c), (t == c) & (p != c)
    return np.stack([tp, fp, fn], axis=-1).reshape(len(y_true), -1).astype(np.float64)


def _macro_f1_finish(sums: np.ndarray) -> np.ndarray:
    """Macro-F1 from summed (tp, fp, fn) per class: the mean over classes present (in
    references or predictions) of 2 tp / (2 tp + fp + fn); NaN when no class is present."""
    s = sums.reshape(*sums.shape[:-1], -1, 3)
    tp, fp, fn = s[..., 0], s[..., 1], s[..., 2]
    den = 2 * tp + fp + fn
    present = den > 0
    f1 = np.where(present, 2 * tp / np.where(present, den, 1.0), 0.0)
    n = present.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, f1.sum(-1) / np.maximum(n, 1), np.nan)


def _perplexity_finish(sums: np.ndarray) -> np.ndarray:
    return np.exp(np.minimum(ratio(sums), 700.0))


def metric_terms(
    columns: Mapping[str, Sequence[Any]],
    metric: str,
    rows: Sequence[int] | None = None,
    classes: Sequence[Any] | None = None,
) -> tuple[np.ndarray, Finish, list[int]] | None:
    """``(terms, finish, used)`` of `metric` over the examples `rows` of `columns` (default:
    all): `finish(terms.sum(0))` is the metric and `used` the examples that enter it (those
    with a loss, a Rouge-L score or a label). None when no example has the metric.

    ``classes`` fixes the class list of macro-F1 (two methods compared on the same examples
    must share it); default: the classes in these references and predictions.
    """
    idx = list(range(len(columns["task"]))) if rows is None else list(rows)
    if metric in ("loss", "perplexity"):
        nll, ntok = columns.get("nll"), columns.get("ntok")
        used = [i for i in idx if nll is not None and nll[i] is not None and ntok[i]]
        if not used:
            return None
        terms = np.array([[nll[i], ntok[i]] for i in used], dtype=np.float64)
        return terms, (ratio if metric == "loss" else _perplexity_finish), used
    if metric == "rouge_l":
        col = columns.get("rouge_l")
        used = [i for i in idx if col is not None and col[i] is not None]
        if not used:
            return None
        return np.array([[col[i], 1.0] for i in used], dtype=np.float64), ratio, used
    if metric in ("accuracy", "f1"):
        lab, pred = columns.get("label"), columns.get("pred")
        used = [i for i in idx if lab is not None and lab[i] is not None]
        if not used:
            return None
        t, p = [lab[i] for i in used], [pred[i] for i in used]
        if metric == "accuracy":
            return _accuracy_terms(t, p), ratio, used
        return _f1_terms(t, p, classes), _macro_f1_finish, used
    raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


# -- helpers --------------------------------------------------------------------------------


def _unwrap(model: Any) -> Any:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def model_kind(model: Any) -> str:
    """``"classifier"`` for sequence-classification models, else ``"causal"``."""
    name = type(_unwrap(model)).__name__
    return "classifier" if name.endswith("ForSequenceClassification") else "causal"


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _pad(seqs: Sequence[Sequence[int]], pad: int, left: bool = False):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, n - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, n - len(s) :] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
    return ids, mask


def _token_logprobs(model: Any, seqs: Sequence[dict[str, list[int]]], pad: int, device):
    """Per sequence: (sum of response-token log-probs, number of response tokens), float64."""
    ids, mask = _pad([s["input_ids"] for s in seqs], pad)
    labels, _ = _pad([s["labels"] for s in seqs], IGNORE_INDEX)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    # only response positions, in float64: the prompt's (many) vocabulary rows are skipped
    rows = logits[keep].double()
    picked = torch.log_softmax(rows, dim=-1).gather(-1, target[keep].unsqueeze(-1)).squeeze(-1)
    per_seq = torch.zeros(len(seqs), dtype=torch.float64, device=picked.device)
    per_seq.index_add_(0, keep.nonzero()[:, 0], picked)
    return per_seq.cpu(), keep.sum(1).cpu()


def _prompt_ids(tokenizer: Any, example: Any, max_prompt: int) -> list[int]:
    from fedlora.data.prompts import has_chat_template, prompt_text

    ids = list(tokenizer(prompt_text(tokenizer, example), add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if not has_chat_template(tokenizer) and bos is not None:
        ids = [bos, *ids]
    if len(ids) > max_prompt:  # keep the head and the generation marker at the end
        head = max_prompt // 2
        ids = ids[:head] + ids[len(ids) - (max_prompt - head) :]
    return ids


def task_labels(examples: Iterable[Any]) -> dict[str, list[str]]:
    """task -> sorted labels seen in `examples` (the label set of constrained generation)."""
    out: dict[str, set[str]] = defaultdict(set)
    for e in examples:
        if e.label is not None:
            out[e.task].add(e.label)
    return {t: sorted(v) for t, v in out.items()}


# -- evaluation -----------------------------------------------------------------------------


@dataclass
class Evaluation:
    """What `evaluate_detailed` returns: the metrics (as `evaluate`) and the per-example values
    they come from (`example_columns`)."""

    metrics: dict[str, Any]
    examples: dict[str, list[Any]] = field(default_factory=dict)


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    metrics: Sequence[str] = ("loss",),
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate `model` on `examples`: the metrics of `evaluate_detailed` (same arguments)."""
    return evaluate_detailed(model, tokenizer, examples, metrics, **kwargs).metrics


@torch.no_grad()
def evaluate_detailed(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    metrics: Sequence[str] = ("loss",),
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    max_length: int = 256,
    kind: str | None = None,
    labels: Mapping[str, Sequence[str]] | None = None,
    label_to_id: Mapping[str, int] | None = None,
    per_task: bool = False,
    precision: str = "fp32",
    max_generations: int | None = None,
    n_boot: int = 0,
) -> Evaluation:
    """Evaluate `model` on `examples` (see the module docstring).

    ``labels``: task -> label set for constrained generation (default: the labels present in
    `examples` per task). ``label_to_id``: the class ids of an encoder classifier's head
    (default: `fedlora.data.label_mapping` of `examples`). ``kind`` is detected from the model.
    Batches go to the model's device; forward passes and generation run under the autocast of
    ``precision`` (as in training, `fedlora.clients.device.Amp`); log-probabilities are summed in
    float64 (autocast leaves float64 alone). ``max_generations``: greedy generations for
    Rouge-L, a fixed evenly spread sample of the generation examples (None: all). ``n_boot``:
    bootstrap resamples of each metric's 95% CI (0: no CIs).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples = list(examples)
    kind = kind or model_kind(model)
    amp = Amp.of(model, precision)
    was_training = model.training
    model.eval()
    try:
        with amp.autocast():
            rows = _evaluate_rows(
                model, tokenizer, examples, metrics, kind, batch_size, max_new_tokens,
                max_length, labels, label_to_id, max_generations,
            )  # fmt: skip
    finally:
        model.train(was_training)
    columns = example_columns(rows)
    out = _summarise(columns, None, metrics, n_boot)
    out["n_examples"] = float(len(examples))
    if per_task:
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, task in enumerate(columns["task"]):
            by_task[task].append(i)
        for task in sorted(by_task):
            for k, v in _summarise(columns, by_task[task], metrics, n_boot).items():
                if not k.startswith("n_"):
                    out[f"{task}/{k}"] = v
    return Evaluation(out, columns)


def _evaluate_rows(model, tokenizer, examples, metrics, kind, batch_size, max_new_tokens,
                   max_length, labels, label_to_id, max_generations):  # fmt: skip
    if kind == "classifier":
        return _eval_classifier(model, tokenizer, examples, batch_size, max_length, label_to_id)
    return _eval_causal(
        model, tokenizer, examples, metrics, batch_size, max_new_tokens, max_length, labels,
        max_generations,
    )  # fmt: skip


def example_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Per-example values as columns (JSON-ready): ``task``, and where evaluated ``nll`` (summed
    over response tokens) and ``ntok``, ``rouge_l``, ``label`` and ``pred`` (None where an
    example has no such value). Columns with no value at all are left out."""
    keys = {"nll": "nll", "ntok": "ntok", "rouge_l": "rouge_l"}
    keys.update(label="true_label", pred="predicted_label")
    out: dict[str, list[Any]] = {"task": [r["task"] for r in rows]}
    for col, key in keys.items():
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            out[col] = values
    return out


def _summarise(columns, rows, metrics: Sequence[str], n_boot: int) -> dict[str, Any]:
    """The metrics (and with n_boot > 0 their 95% CIs) over the examples `rows` (None: all)."""
    idx = list(range(len(columns["task"]))) if rows is None else list(rows)
    out: dict[str, Any] = {}
    for metric in METRICS:
        if metric not in metrics:
            continue
        got = metric_terms(columns, metric, idx)
        if got is None:
            continue
        terms, finish, _ = got
        out[metric] = float(finish(terms.sum(0)))
        if n_boot > 0:
            out[f"{metric}_ci95"] = list(bootstrap_ci(terms, finish, n_boot=n_boot, seed=0))
    ntok = columns.get("ntok")
    out["n_tokens"] = float(sum(ntok[i] or 0 for i in idx)) if ntok else 0.0
    rouge, label = columns.get("rouge_l"), columns.get("label")
    out["n_generation"] = float(sum(rouge[i] is not None for i in idx)) if rouge else 0.0
    out["n_classification"] = float(sum(label[i] is not None for i in idx)) if label else 0.0
    return out


def _spread(items: Sequence[int], k: int | None) -> list[int]:
    """`k` items evenly spread over `items` (all when k is None or k >= len)."""
    if k is None or k >= len(items):
        return list(items)
    return [items[int(j * len(items) / k)] for j in range(k)]


def _eval_causal(model, tokenizer, examples, metrics, batch_size, max_new_tokens, max_length,
                 labels, max_generations=None):  # fmt: skip
    from fedlora.data.examples import Example
    from fedlora.data.prompts import encode_example, pad_id

    device = model_device(model)
    pad = pad_id(tokenizer, model)
    rows: list[dict[str, Any]] = [{"task": e.task} for e in examples]
    if "loss" in metrics or "perplexity" in metrics:
        enc = [encode_example(tokenizer, e, max_length) for e in examples]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]["input_ids"]))
        for idx in _batches(order, batch_size):
            s, n = _token_logprobs(model, [enc[i] for i in idx], pad, device)
            for j, i in enumerate(idx):
                rows[i]["nll"] = -float(s[j])
                rows[i]["ntok"] = int(n[j])
    gen_idx = _spread([i for i, e in enumerate(examples) if e.label is None], max_generations)
    if "rouge_l" in metrics and gen_idx:
        max_prompt = max(1, max_length - max_new_tokens)
        prompts = {i: _prompt_ids(tokenizer, examples[i], max_prompt) for i in gen_idx}
        gen_idx.sort(key=lambda i: len(prompts[i]))
        for idx in _batches(gen_idx, batch_size):
            ids, mask = _pad([prompts[i] for i in idx], pad, left=True)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,  # the KV cache: each new token attends to cached keys/values
                pad_token_id=pad,
                eos_token_id=getattr(tokenizer, "eos_token_id", None),
            )
            for j, i in enumerate(idx):
                text = tokenizer.decode(out[j, ids.shape[1] :], skip_special_tokens=True)
                rows[i]["prediction"] = text.strip()
                rows[i]["reference"] = examples[i].output
        scores = rouge_l_scores(
            [rows[i]["prediction"] for i in gen_idx], [rows[i]["reference"] for i in gen_idx]
        )
        for i, score in zip(gen_idx, scores):
            rows[i]["rouge_l"] = score
    cls_idx = [i for i, e in enumerate(examples) if e.label is not None]
    if ("accuracy" in metrics or "f1" in metrics) and cls_idx:
        label_sets = dict(labels) if labels is not None else task_labels(examples)
        pairs: list[tuple[int, str, dict[str, list[int]]]] = []
        for i in cls_idx:
            e = examples[i]
            choices = list(label_sets.get(e.task) or [e.label])
            for lab in choices:
                cand = Example(e.task, e.instruction, e.input, lab, lab)
                pairs.append((i, lab, encode_example(tokenizer, cand, max_length)))
        order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][2]["input_ids"]))
        scores: dict[int, list[tuple[float, str]]] = defaultdict(list)
        for ks in _batches(order, batch_size):
            s, _ = _token_logprobs(model, [pairs[k][2] for k in ks], pad, device)
            for j, k in enumerate(ks):
                scores[pairs[k][0]].append((float(s[j]), pairs[k][1]))
        for i in cls_idx:
            # highest log-likelihood; ties go to the first label in sorted order
            best = max(sorted(scores[i], key=lambda x: x[1]), key=lambda x: x[0])
            rows[i]["predicted_label"] = best[1]
            rows[i]["true_label"] = examples[i].label
    return rows


def _eval_classifier(model, tokenizer, examples, batch_size, max_length, label_to_id):
    from fedlora.data.prompts import encode_classification, label_mapping, pad_id

    examples = [e for e in examples if e.label is not None]
    label_to_id = dict(label_to_id or label_mapping(examples))
    id_to_label = {i: lab for lab, i in label_to_id.items()}
    device = model_device(model)
    pad = pad_id(tokenizer, model)
    rows: list[dict[str, Any]] = []
    enc = [encode_classification(tokenizer, e, label_to_id, max_length) for e in examples]
    for idx in _batches(list(range(len(enc))), batch_size):
        ids, mask = _pad([enc[i]["input_ids"] for i in idx], pad)
        kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if "token_type_ids" in enc[idx[0]]:
            kwargs["token_type_ids"] = _pad([enc[i]["token_type_ids"] for i in idx], 0)[0].to(
                device
            )
        logits = model(**kwargs).logits.double()
        target = torch.tensor([enc[i]["labels"] for i in idx], device=device)
        nll = F.cross_entropy(logits, target, reduction="none")
        pred = logits.argmax(-1)
        for j, i in enumerate(idx):
            rows.append(
                {
                    "task": examples[i].task,
                    "nll": float(nll[j]),
                    "ntok": 1,
                    "predicted_label": id_to_label.get(int(pred[j]), str(int(pred[j]))),
                    "true_label": examples[i].label,
                }
            )
    return rows
