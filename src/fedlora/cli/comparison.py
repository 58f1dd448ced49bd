"""Comparisons of finished runs with uncertainty: what `fedlora compare` and `report` print.

Runs are grouped by label (one strategy, possibly several seeds). For every evaluated set,
metric and task of the last evaluated round, `compare` gives per label:

* ``mean``: the mean over seeds of the metric, ``per_seed`` the values;
* ``ci95``: its percentile bootstrap CI, resampling evaluation examples within each seed
  (the uncertainty of evaluating on a sample, for these trained models);
* ``ci95_seeds``: a Student-t CI over the per-seed values (the spread between seeds, which
  includes training randomness; None with one seed, and wide with two or three);
* against the baseline, on the same seeds and examples (each seed's runs evaluate the same
  examples): ``diff`` (mean over seeds of run minus baseline), ``diff_ci95`` (paired bootstrap)
  and ``p_value`` (two-sided paired permutation test: the two runs' values are swapped example
  by example within each seed).

The per-example values come from each run's ``eval_examples.jsonl`` (`fedlora.clients.evaluate`'s
columns), so everything here can be rebuilt from run directories.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import fedlora.strategies as registry
from fedlora.cli.report import eval_curve, pyplot, save_figure
from fedlora.clients.evaluate import METRICS, metric_terms
from fedlora.core.contract import FedLoraError
from fedlora.core.stats import (
    bootstrap_ci,
    paired_bootstrap_ci,
    paired_permutation_test,
    t_interval,
)
from fedlora.federation.rounds import fmt_bytes

LEVEL = 0.95
LOWER_IS_BETTER = ("loss", "perplexity")


def run_label(run: dict[str, Any]) -> str:
    return str(run["name"])


def run_seed(run: dict[str, Any]) -> int:
    return int((run.get("config") or {}).get("seed", 0))


def group_runs(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """label -> its runs sorted by seed (labels in first-seen order); a clear error when one
    label has two runs with the same seed."""
    out: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(run_label(run), []).append(run)
    for label, rs in out.items():
        seeds = [run_seed(r) for r in rs]
        if len(set(seeds)) != len(seeds):
            dirs = ", ".join(str(r["dir"]) for r in rs)
            raise FedLoraError(f"runs {dirs}: several runs of {label!r} with the same seed")
        rs.sort(key=run_seed)
    return out


def default_baseline(labels: Sequence[str], strategies: Sequence[str]) -> str:
    """The homogeneous-rank FedIT-style run if there is one, else the first label."""
    for label, strategy in zip(labels, strategies):
        if strategy in registry.names() and registry.get_class(strategy).homogeneous_only:
            return label
    return labels[0]


def final_examples(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """set -> the per-example columns of the run's last evaluated round."""
    out: dict[str, dict[str, Any]] = {}
    for row in run.get("examples") or []:
        if row["set"] not in out or row["round"] >= out[row["set"]]["round"]:
            out[row["set"]] = row
    return out


def _metric_keys(columns: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(task or None for all, metric) of every metric these columns hold."""
    tasks = sorted(set(columns["task"]))
    keys: list[tuple[str | None, str]] = []
    for task in [None, *tasks]:
        rows = None if task is None else [i for i, t in enumerate(columns["task"]) if t == task]
        for metric in METRICS:
            if metric == "perplexity":
                continue  # exp(loss): the same test and a monotone transform of its CI
            if metric_terms(columns, metric, rows) is not None:
                keys.append((task, metric))
    return keys


def _rows(columns: dict[str, Any], task: str | None) -> list[int] | None:
    if task is None:
        return None
    return [i for i, t in enumerate(columns["task"]) if t == task]


def _classes(*cols: dict[str, Any]) -> list[str]:
    found = {str(v) for c in cols for k in ("label", "pred") for v in c.get(k) or [] if v}
    return sorted(found)


def _pair(label: str, base: str, seed: int, s: str, a: dict, b: dict) -> None:
    if list(a["example"]) != list(b["example"]):
        raise FedLoraError(
            f"{label!r} and the baseline {base!r} evaluated different examples of {s} with "
            f"seed {seed}: they are not comparable (run them with the same data and eval keys)"
        )


def compare(
    runs: Sequence[dict[str, Any]],
    baseline: str | None = None,
    *,
    n_boot: int = 1000,
    n_perm: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """The comparison of `runs` (from `fedlora.cli.report.load_run`) described in the module
    docstring, as a JSON-ready dict; `baseline` is a label (default: `default_baseline`)."""
    groups = group_runs(runs)
    labels = list(groups)
    strategies = [(g[0]["summary"] or {}).get("strategy", "") for g in groups.values()]
    base = baseline or default_baseline(labels, strategies)
    if base not in groups:
        by_strategy = [lab for lab, st in zip(labels, strategies) if st == base]
        if len(by_strategy) != 1:
            raise FedLoraError(f"--baseline {base!r}: not one of the runs ({', '.join(labels)})")
        base = by_strategy[0]
    base_runs = {run_seed(r): final_examples(r) for r in groups[base]}
    out: dict[str, Any] = {
        "level": LEVEL,
        "baseline": base,
        "seeds": sorted({run_seed(r) for r in runs}),
        "order": labels,
        "method": (
            "mean over seeds; ci95: percentile bootstrap over evaluation examples within seeds "
            f"({n_boot} resamples); ci95_seeds: Student-t over seeds; p_value: two-sided paired "
            f"permutation test against the baseline (swaps per example within seeds, {n_perm} "
            "draws or exact); diff_ci95: paired bootstrap"
        ),
        "strategies": {},
    }
    for label, group in groups.items():
        entry: dict[str, Any] = {
            "strategy": strategies[labels.index(label)],
            "seeds": [run_seed(r) for r in group],
            "runs": [str(r["dir"]) for r in group],
            **_costs(group),
            "metrics": {},
        }
        per_seed = {run_seed(r): final_examples(r) for r in group}
        sets = sorted({s for ex in per_seed.values() for s in ex})
        for s in sets:
            seeds = [k for k in per_seed if s in per_seed[k]]
            first = per_seed[seeds[0]][s]
            for task, metric in _metric_keys(first):
                key = "/".join(x for x in (s, task, metric) if x)
                entry["metrics"][key] = _one_metric(
                    label, base, s, task, metric, per_seed, base_runs, seeds, n_boot, n_perm, seed
                )
        out["strategies"][label] = entry
    return out


def _one_metric(label, base, s, task, metric, per_seed, base_runs, seeds, n_boot, n_perm, seed):
    terms, values, n = [], [], 0
    for k in seeds:
        cols = per_seed[k][s]
        got = metric_terms(cols, metric, _rows(cols, task))
        if got is None:
            continue
        t, finish, _ = got
        terms.append(t)
        values.append(float(finish(t.sum(0))))
        n += t.shape[0]
    res: dict[str, Any] = {"mean": float(np.mean(values)) if values else None}
    res["ci95"] = _clean(bootstrap_ci(terms, finish, n_boot=n_boot, seed=seed)) if terms else None
    res["per_seed"] = values
    res["ci95_seeds"] = _clean(t_interval(values, LEVEL)) if len(values) > 1 else None
    res["n_examples"] = n
    if label == base:
        res.update(diff=None, diff_ci95=None, p_value=None)
        return res
    pa, pb = [], []
    for k in seeds:
        if k not in base_runs or s not in base_runs[k]:
            continue
        a, b = per_seed[k][s], base_runs[k][s]
        _pair(label, base, k, s, a, b)
        classes = _classes(a, b)
        ga = metric_terms(a, metric, _rows(a, task), classes)
        gb = metric_terms(b, metric, _rows(b, task), classes)
        if ga is None or gb is None or ga[2] != gb[2]:
            continue  # e.g. a metric the baseline did not evaluate
        pa.append(ga[0])
        pb.append(gb[0])
        finish = ga[1]
    if not pa:
        res.update(diff=None, diff_ci95=None, p_value=None)
        return res
    diff = float(np.mean([finish(x.sum(0)) - finish(y.sum(0)) for x, y in zip(pa, pb)]))
    res["diff"] = diff
    res["diff_ci95"] = _clean(paired_bootstrap_ci(pa, pb, finish, n_boot=n_boot, seed=seed))
    res["p_value"] = _num(paired_permutation_test(pa, pb, finish, n_perm=n_perm, seed=seed))
    return res


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _clean(ci: tuple[float, float]) -> list[float | None]:
    return [_num(ci[0]), _num(ci[1])]


def _costs(group: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean bytes and wall time over a label's runs."""
    out: dict[str, Any] = {}
    for key, name in (
        ("bytes_up", "bytes_up"),
        ("bytes_down", "bytes_down"),
        ("comm_ratio_vs_full_ft", "comm_ratio_vs_full_ft"),
        ("time_total", "wall_s"),
    ):
        vals = [(r["summary"] or {}).get(key) for r in group]
        vals = [v for v in vals if v is not None]
        out[name] = float(np.mean(vals)) if vals else None
    # under differential privacy: the runs' epsilon (the largest, a guarantee for all seeds)
    eps = [((r["summary"] or {}).get("privacy") or {}).get("epsilon") for r in group]
    eps = [e for e in eps if e is not None]
    out["epsilon"] = float(max(eps)) if eps else None
    return out


# -- text ------------------------------------------------------------------------------------


def headline_keys(result: dict[str, Any]) -> list[str]:
    """The keys of the table: loss and the first of Rouge-L / accuracy / F1 of each set, over
    all tasks (per-task keys stay in compare.json)."""
    keys: list[str] = []
    base = result["strategies"][result["baseline"]]["metrics"]
    for s in ("seen_clients", "unseen_clients", "unseen_tasks"):
        for metric in ("loss", "accuracy", "rouge_l"):
            if f"{s}/{metric}" in base:
                keys.append(f"{s}/{metric}")
    return keys


def _short(key: str) -> str:
    s, metric = key.split("/", 1)
    return f"{s.replace('_clients', '').replace('_', ' ')} {metric}"


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(ci: list[float | None] | None, digits: int = 4) -> str:
    return "-" if not ci or ci[0] is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def format_compare(result: dict[str, Any]) -> str:
    """compare.txt: the metrics with 95% CIs and costs, then each run against the baseline."""
    keys = headline_keys(result)
    n_seeds = len(result["seeds"])
    dp = any(result["strategies"][lab].get("epsilon") is not None for lab in result["order"])
    head = ["run", *(_short(k) for k in keys), "bytes up", "bytes down", "vs full FT"]
    head += ["epsilon"] * dp + ["wall s"]
    rows = []
    for label in result["order"]:
        e = result["strategies"][label]
        cells = [label]
        for k in keys:
            m = e["metrics"].get(k)
            cells.append("-" if m is None else f"{_fmt(m['mean'])} {_ci(m['ci95'])}")
        cells += [
            fmt_bytes(e["bytes_up"]),
            fmt_bytes(e["bytes_down"]),
            "-" if e["comm_ratio_vs_full_ft"] is None else f"{e['comm_ratio_vs_full_ft']:.2%}",
        ]
        if dp:
            cells.append(_fmt(e.get("epsilon"), 3))
        cells.append(_fmt(e["wall_s"], 1))
        rows.append(cells)
    lines = [
        f"mean [95% CI] over {n_seeds} seed{'s' if n_seeds > 1 else ''} "
        f"({', '.join(map(str, result['seeds']))}); CI: bootstrap over evaluation examples",
        _table(head, rows),
        "",
        f"difference from the baseline {result['baseline']!r} [95% CI], paired permutation "
        "p-value (* p < 0.05); loss: negative is better",
    ]
    head2 = ["run", *(_short(k) for k in keys)]
    rows2 = []
    for label in result["order"]:
        if label == result["baseline"]:
            continue
        e = result["strategies"][label]
        cells = [label]
        for k in keys:
            m = e["metrics"].get(k)
            if m is None or m.get("diff") is None:
                cells.append("-")
                continue
            star = "*" if m["p_value"] is not None and m["p_value"] < 0.05 else " "
            cells.append(f"{m['diff']:+.4f} {_ci(m['diff_ci95'])} {_p(m['p_value'])}{star}")
        rows2.append(cells)
    lines.append(_table(head2, rows2))
    return "\n".join(lines)


def _p(p: float | None) -> str:
    if p is None:
        return "p=-"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def significance_summary(result: dict[str, Any], alpha: float = 0.05) -> list[str]:
    """One sentence per headline metric: which runs differ significantly from the baseline."""
    out = []
    for k in headline_keys(result):
        better, worse, same = [], [], []
        lower = k.rsplit("/", 1)[-1] in LOWER_IS_BETTER
        for label in result["order"]:
            m = result["strategies"][label]["metrics"].get(k)
            if label == result["baseline"] or not m or m.get("p_value") is None:
                continue
            if m["p_value"] >= alpha:
                same.append(label)
            elif (m["diff"] < 0) == lower:
                better.append(label)
            else:
                worse.append(label)
        parts = []
        if better:
            parts.append(f"better: {', '.join(better)}")
        if worse:
            parts.append(f"worse: {', '.join(worse)}")
        if same:
            parts.append(f"not significantly different: {', '.join(same)}")
        out.append(f"{_short(k)} vs {result['baseline']}: " + "; ".join(parts))
    return out


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]

    def line(xs):
        return "  ".join(
            x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(xs, widths))
        ).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# -- curves with bands -----------------------------------------------------------------------


def curve(
    group: Sequence[dict[str, Any]],
    metric: str,
    eval_set: str = "seen_clients",
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[list[int], list[float], list[float], list[float]]:
    """(rounds, mean over seeds, CI low, CI high) of `metric` on `eval_set` for one label's
    runs; the band is the bootstrap over examples within seeds."""
    by_round: dict[int, list[np.ndarray]] = {}
    finish = None
    for run in group:
        for row in run.get("examples") or []:
            if row["set"] != eval_set:
                continue
            got = metric_terms(row, metric)
            if got is None:
                continue
            finish = got[1]
            by_round.setdefault(int(row["round"]), []).append(got[0])
    xs, ms, los, his = [], [], [], []
    for rnd in sorted(by_round):
        terms = by_round[rnd]
        if len(terms) != len(group):
            continue  # a round not every seed evaluated
        xs.append(rnd)
        ms.append(float(np.mean([finish(t.sum(0)) for t in terms])))
        lo, hi = bootstrap_ci(terms, finish, n_boot=n_boot, seed=seed)
        los.append(lo)
        his.append(hi)
    return xs, ms, los, his


def plot_compare(runs: Sequence[dict[str, Any]], out_dir: str | Path) -> Path:
    """All labels' curves together: eval loss, accuracy and Rouge-L by round on seen clients
    (mean over seeds, band: 95% bootstrap CI over examples within seeds, from
    ``eval_examples.jsonl``; runs without it are drawn without a band), cumulative bytes."""
    plt = pyplot()
    evals = [r for run in runs for r in run["rows"] if r.get("kind") == "eval"]
    keys = ["loss"] + [m for m in ("accuracy", "rouge_l") if any(m in r for r in evals)]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(5 * (len(keys) + 1), 3.8), squeeze=False)
    for i, (label, group) in enumerate(group_runs(runs).items()):
        color = f"C{i % 10}"
        for ax, key in zip(axes[0], keys):
            xs, ys, lo, hi = curve(group, key)
            if not xs:  # no per-example values: the first run's curve as recorded
                xs, ys = eval_curve(group[0]["rows"], key)
            ax.plot(xs, ys, marker="o", label=label, color=color)
            if len(xs) == 1 and len(lo) == 1:  # one evaluated round: an error bar
                err = [[ys[0] - lo[0]], [hi[0] - ys[0]]]
                ax.errorbar(xs, ys, yerr=err, color=color, capsize=4, linestyle="none")
            elif xs and len(lo) == len(xs):
                ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
            ax.set(xlabel="round", ylabel=key, title=f"seen clients: {key} (95% CI)")
        rr = [r for r in group[0]["rows"] if r.get("kind") == "round"]
        axes[0][-1].plot(
            [r["round"] for r in rr],
            [(r["bytes_up_total"] + r["bytes_down_total"]) / 2**20 for r in rr],
            marker="o",
            label=label,
            color=color,
        )
    axes[0][-1].set(xlabel="round", ylabel="MiB", title="cumulative communication")
    for ax in axes[0]:
        ax.legend(fontsize=8)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out / "compare.png")
