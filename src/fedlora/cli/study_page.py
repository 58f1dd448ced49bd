"""A study's section of docs/fidelity.md, computed from its compact results alone.

`render_study` gives the markdown (deterministic: the bootstrap and permutation draws are
seeded, so the same results give the same text); `write_section` puts it between the
study's ``<!-- reproduce:<name>:begin/end -->`` markers; `plot_curves` draws the learning
curves. Statistics are `fedlora.cli.comparison`'s: mean over seeds, a bootstrap CI over
evaluation examples, and against a baseline the paired difference, its paired bootstrap CI
and a two-sided paired permutation p-value on the same seeds and examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.cli import comparison
from fedlora.cli.study import LEVEL, Study, as_run
from fedlora.core.contract import FedLoraError

Results = dict[tuple[str, str, int], dict[str, Any]]


def _runs_of(study: Study, results: Results, cell: str, label: str, tag: str) -> list[dict]:
    out = []
    for seed in study.all_seeds():
        r = results.get((cell, label, seed))
        if r is not None:
            run = as_run(r)
            run["name"] = tag
            out.append(run)
    return out


def compare_pair(study: Study, results: Results, a: str, b: str) -> dict[str, Any] | None:
    """`comparison.compare` of run ``a`` against baseline ``b`` (each ``cell/label``) over
    the seeds both have; None until both have at least one."""
    ca, _, la = a.partition("/")
    cb, _, lb = b.partition("/")
    ra, rb = _runs_of(study, results, ca, la, a), _runs_of(study, results, cb, lb, b)
    seeds = {r["config"]["seed"] for r in ra} & {r["config"]["seed"] for r in rb}
    ra = [r for r in ra if r["config"]["seed"] in seeds]
    rb = [r for r in rb if r["config"]["seed"] in seeds]
    if not ra or not rb:
        return None
    return comparison.compare(ra if a == b else ra + rb, baseline=b)


def _value(metric: str, x: float | None) -> str:
    if x is None:
        return "–"
    if metric.endswith(("accuracy", "f1", "rouge_l")):
        return f"{100 * x:.1f}"
    return f"{x:.4f}"


def _signed(metric: str, x: float | None) -> str:
    if x is None:
        return "–"
    return ("+" if x >= 0 else "") + _value(metric, x)


def _with_ci(metric: str, m: dict[str, Any]) -> str:
    ci = m.get("ci95") or [None, None]
    return f"{_value(metric, m['mean'])} [{_value(metric, ci[0])}, {_value(metric, ci[1])}]"


def _p(p: float | None) -> str:
    if p is None:
        return "–"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def verdict(metric: str, diff: float | None, p: float | None, expect: str = "better") -> str:
    """``holds`` when run a is significantly better than b as the claim expects (``expect``
    ``better``; ``worse`` for a claim that a trails), ``reversed`` when significantly the
    other way, ``not significant`` otherwise; better means lower for a loss."""
    if diff is None or p is None:
        return "pending"
    if p >= LEVEL or diff == 0:
        return "not significant"
    a_better = diff < 0 if metric.split("/")[-1] in comparison.LOWER_IS_BETTER else diff > 0
    return "holds" if a_better == (expect == "better") else "reversed"


def render_study(study: Study, results: Results) -> str:
    """The study's section: status, floors, results and differences per cell, verdicts per
    claim, the checks' comparisons (no verdict), learning curves and costs."""
    parts = [_status(study, results), _floors(study, results), _table(study, results)]
    parts += [_claims(study, results), _checks(study, results), _curves(study, results)]
    parts.append(_costs(study, results))
    return "\n\n".join(p for p in parts if p) + "\n"


def _status(study: Study, results: Results) -> str:
    units = study.units()
    done = sum((u.cell, u.label, u.seed) in results for u in units)
    hw = sorted({r.get("hardware", {}).get("cpu", "?") for r in results.values()})
    prec = sorted({r.get("precision", "?") for r in results.values()})
    line = (
        f"Scale `{study.scale}`: {done} of {len(units)} runs finished "
        f"({len(study.cells)} cells x {len(study.runs)} runs x seeds {study.seeds}). "
        f"Headline metric: `{study.metric}`."
    )
    if results:
        line += f" Precision: {', '.join(prec)}. Hardware: {'; '.join(hw)}."
    return line


def _floors(study: Study, results: Results) -> str:
    if not study.floors:
        return ""
    rows = ["| floor | run | needed | reached | met |", "|---|---|---|---|---|"]
    for f in study.floors:
        metric = f.get("metric", study.metric)
        seeds = sum((*f["run"].split("/", 1), s) in results for s in study.all_seeds())
        if "than" in f:  # significantly better than another run (e.g. the untrained model)
            res = compare_pair(study, results, f["run"], f["than"])
            m = res["strategies"][f["run"]]["metrics"].get(metric) if res else None
            v = verdict(metric, m["diff"], m["p_value"]) if m else "pending"
            met = "pending" if m is None else ("yes" if v == "holds" else "**no**")
            needed = f"better than `{f['than']}`, p < {LEVEL}"
            reached = "–" if m is None else f"{_signed(metric, m['diff'])} {_p(m['p_value'])}"
        else:
            cell, _, label = f["run"].partition("/")
            runs = _runs_of(study, results, cell, label, f["run"])
            got = comparison.compare(runs)["strategies"][f["run"]]["metrics"] if runs else {}
            m = got.get(metric)
            met = "pending" if m is None else ("yes" if m["mean"] >= f["at_least"] else "**no**")
            needed = f">= {_value(metric, f['at_least'])}"
            reached = _with_ci(metric, m) if m else "–"
        if m is not None and seeds < len(study.all_seeds()):
            met += f" ({seeds} of {len(study.all_seeds())} seeds)"
        rows.append(f"| {f.get('text', '')} | `{f['run']}` | {needed} | {reached} | {met} |")
    return "**Floors** (a verdict below means something only where its floor is met):\n\n" + (
        "\n".join(rows)
    )


def _table(study: Study, results: Results) -> str:
    metric = study.metric
    labels = list(study.runs)
    head = "| cell | " + " | ".join(study.display(lab) for lab in labels) + " |"
    rows = [head, "|---|" + "---|" * len(labels)]
    diffs = [head.replace("| cell |", "| cell (vs baseline) |"), rows[1]]
    for cell in study.cells:
        vals, dvals = [], []
        base = cell.get("baseline") or study.baseline
        base = base if "/" in base else f"{cell['name']}/{base}"  # "cell/run": another cell's
        for lab in labels:
            if lab not in cell["runs"]:
                vals.append("")
                dvals.append("")
                continue
            ref = f"{cell['name']}/{lab}"
            res = compare_pair(study, results, ref, base)
            if res is None:  # the baseline has not finished: the run alone
                res = compare_pair(study, results, ref, ref)
            m = res["strategies"][ref]["metrics"].get(metric) if res else None
            vals.append(_with_ci(metric, m) if m else "–")
            if ref == base or m is None or m.get("diff") is None:
                dvals.append("baseline" if ref == base else "–")
            else:
                dvals.append(f"{_signed(metric, m['diff'])} {_p(m['p_value'])}")
        rows.append(f"| {cell['name']} | " + " | ".join(vals) + " |")
        diffs.append(f"| {cell['name']} | " + " | ".join(dvals) + " |")
    unit = "%" if metric.endswith(("accuracy", "f1", "rouge_l")) else ""
    text = (
        f"**{metric}**{' (%)' if unit else ''}, mean over seeds [95% bootstrap CI over "
        "evaluation examples]:\n\n" + "\n".join(rows)
    )
    if all(len(c["runs"]) == 1 for c in study.cells):  # nothing to compare within a cell
        return text
    return text + (
        "\n\nDifference from the cell's baseline (paired over seeds and examples; two-sided "
        "paired permutation p):\n\n" + "\n".join(diffs)
    )


def _pair_row(study: Study, results: Results, c: dict[str, Any]) -> tuple[str, dict | None]:
    """A claim's or check's row up to its p-value, and the comparison (None while pending)."""
    metric = c.get("metric", study.metric)
    res = compare_pair(study, results, c["a"], c["b"])
    m = res["strategies"][c["a"]]["metrics"].get(metric) if res else None
    row = f"| {c['text']} | `{c['a']}` | `{c['b']}` |"
    if m is None:
        return row + " – | – |", None
    ci = m.get("diff_ci95") or [None, None]
    row += f" {_signed(metric, m['diff'])} [{_signed(metric, ci[0])}, {_signed(metric, ci[1])}]"
    return row + f" | {_p(m['p_value'])} |", m


def _claims(study: Study, results: Results) -> str:
    if not study.claims:
        return ""
    rows = ["| claim | a | b | a - b [95% CI] | p | verdict |", "|---|---|---|---|---|---|"]
    for c in study.claims:
        row, m = _pair_row(study, results, c)
        metric = c.get("metric", study.metric)
        v = verdict(metric, m["diff"], m["p_value"], c.get("expect", "better")) if m else None
        rows.append(row + (f" **{v}** |" if v else " pending |"))
    return "**Claims** (a verdict holds / reversed needs p < 0.05):\n\n" + "\n".join(rows)


def _checks(study: Study, results: Results) -> str:
    if not study.checks:
        return ""
    rows = ["| check | a | b | a - b [95% CI] | p |", "|---|---|---|---|---|"]
    rows += [_pair_row(study, results, c)[0] for c in study.checks]
    return (
        "**Checks** (comparisons of the diagnostic runs; they test no claim of the paper, so no "
        "verdict; a rule stated with a cell in the study file says what it decides):\n\n"
        + "\n".join(rows)
    )


def curve_points(study: Study, results: Results, cell: str, label: str) -> dict[int, float]:
    """round -> the headline metric averaged over the seeds that evaluated it."""
    s, _, metric = study.metric.partition("/")
    acc: dict[int, list[float]] = {}
    for seed in study.all_seeds():
        r = results.get((cell, label, seed))
        for row in (r or {}).get("curve", []):
            if row.get("set") == s and row.get(metric) is not None:
                acc.setdefault(row["round"], []).append(row[metric])
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


def _curves(study: Study, results: Results) -> str:
    lines = []
    for cell in study.cells:
        for lab in cell["runs"]:
            pts = curve_points(study, results, cell["name"], lab)
            if pts:
                text = ", ".join(f"{k}: {_value(study.metric, v)}" for k, v in pts.items())
                lines.append(f"| {cell['name']} | {study.display(lab)} | {text} |")
    if not lines:
        return ""
    return (
        f"<details><summary>Learning curves ({study.metric} by round, mean over seeds)"
        "</summary>\n\n| cell | run | round: value |\n|---|---|---|\n" + "\n".join(lines)
        + "\n\n</details>"
    )


def _costs(study: Study, results: Results) -> str:
    rows = ["| cell | runs | min, all runs | min a run (range) | precision | device | hardware |",
            "|---|---:|---:|---|---|---|---|"]  # fmt: skip
    for cell in study.cells:
        # training runs only: an untrained reference is one evaluation (well under a minute)
        rs = [r for (c, lab, _), r in results.items()
              if c == cell["name"] and not study.runs[lab]["untrained"]]  # fmt: skip
        if not rs:
            continue
        # the run's own round times: they span a resumed run's parts (the landing process's
        # wall time, also in each result, covers only its last part)
        mins = [r["summary"]["time_total"] / 60 for r in rs]
        prec = ", ".join(sorted({r["precision"] for r in rs}))
        dev = ", ".join(sorted({r["device"] for r in rs}))
        hw = "; ".join(sorted({r["hardware"]["cpu"] for r in rs}))
        rows.append(f"| {cell['name']} | {len(rs)} | {sum(mins):.1f} | {sum(mins) / len(rs):.1f} "
                    f"({min(mins):.1f}-{max(mins):.1f}) | {prec} | {dev} | {hw} |")  # fmt: skip
    return (
        "Cost of the finished runs: the time of their rounds (training, aggregation and "
        "evaluation; each run one process, one torch thread, beside at most one other; an "
        "untrained reference, one evaluation, is left out):\n\n"
        + "\n".join(rows)
    )


def markers(name: str) -> tuple[str, str]:
    return f"<!-- reproduce:{name}:begin -->", f"<!-- reproduce:{name}:end -->"


def write_section(doc: Path, name: str, text: str) -> bool:
    """Put `text` between the study's markers in `doc` (appended with its markers when the
    page has none; the page is created if missing); True when the page changed."""
    begin, end = markers(name)
    old = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    if begin in old:
        if end not in old or old.index(end) < old.index(begin):
            raise FedLoraError(f"{doc}: marker {begin} has no {end} after it")
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1]
        new = f"{head}{begin}\n{text}{end}{tail}"
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + f"{begin}\n{text}{end}\n"
    if new != old:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(new, encoding="utf-8")
    return new != old


def plot_curves(study: Study, results: Results, path: Path) -> Path | None:
    """One panel per cell: the headline metric by round, one line per run (mean over seeds)."""
    from fedlora.cli.report import pyplot, save_figure

    cells = [c for c in study.cells if any((c["name"], lab, s) in results
             for lab in c["runs"] for s in study.seeds)]  # fmt: skip
    if not cells:
        return None
    plt = pyplot()
    cols = min(3, len(cells))
    rows = -(-len(cells) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    # a run keeps its colour in every panel (cells run different subsets of the runs), and the
    # one legend lists every run drawn anywhere
    colour = {lab: f"C{i % 10}" for i, lab in enumerate(study.runs)}
    handles = {}
    for ax, cell in zip(axes.flat, cells):
        for lab in cell["runs"]:
            pts = curve_points(study, results, cell["name"], lab)
            if pts:
                (handles[lab],) = ax.plot(list(pts), list(pts.values()), marker=".",
                                          color=colour[lab], label=study.display(lab))  # fmt: skip
        ax.set_title(cell["name"], fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel(study.metric.split("/")[-1])
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    order = [lab for lab in study.runs if lab in handles]
    axes.flat[0].legend([handles[lab] for lab in order], [study.display(lab) for lab in order],
                        fontsize=7)  # fmt: skip
    fig.suptitle(study.title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def cells_of(study: Study) -> Sequence[str]:
    return [c["name"] for c in study.cells]
