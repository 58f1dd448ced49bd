"""Tables and plots from run directories (what `fedlora run`, `compare` and `report` show).

Everything here reads files a run wrote (``config.toml``, ``metrics.jsonl``,
``eval_examples.jsonl``, ``summary.json``, and the ``partition.json`` / ``spectrum.json`` that
`write_run_extras` adds), so `fedlora report DIR...` rebuilds every table and plot from
finished runs.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedlora.core.contract import Adapter, ClientSpec, FedLoraError
from fedlora.federation.config import tomllib
from fedlora.federation.rounds import fmt_bytes

LOG = logging.getLogger("fedlora")
HEADLINE = ("rouge_l", "accuracy", "f1")  # the first of these a run has is its "metric"


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A run's rows, summary and extras; a clear error if `run_dir` holds no run."""
    d = Path(run_dir)
    metrics = d / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{d}: no metrics.jsonl (is this a fedlora run directory?)")
    rows = _read_jsonl(metrics, d)
    out: dict[str, Any] = {"dir": d, "rows": rows, "name": d.name}
    for extra in ("summary", "partition", "spectrum"):
        p = d / f"{extra}.json"
        try:
            out[extra] = json.loads(_read_text(p)) if p.is_file() else None
        except json.JSONDecodeError as e:
            raise FedLoraError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None
    examples = d / "eval_examples.jsonl"
    out["examples"] = _read_jsonl(examples, d) if examples.is_file() else []
    config = d / "config.toml"
    out["config"] = tomllib.loads(_read_text(config)) if config.is_file() else None
    if out["summary"]:
        out["name"] = out["summary"].get("label") or out["summary"].get("strategy") or d.name
    return out


def _read_jsonl(path: Path, run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise FedLoraError(
                f"{path}, line {n}: not valid JSON ({e.msg}; a write cut short?); "
                f"`fedlora run --resume {run_dir}` rewrites it from the last checkpoint"
            ) from None
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FedLoraError(f"{path}: not UTF-8 text ({e.reason}); is it a fedlora file?") from None


def headline_metric(rows: Sequence[dict[str, Any]]) -> str | None:
    evals = [r for r in rows if r.get("kind") == "eval"]
    for m in HEADLINE:
        if any(m in r for r in evals):
            return m
    return None


def eval_curve(rows, key: str, eval_set: str = "seen_clients") -> tuple[list[int], list[float]]:
    pts = [
        (r["round"], r[key])
        for r in rows
        if r.get("kind") == "eval" and r.get("set") == eval_set and key in r
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


# -- extras a run directory gets after `run_experiment` ---------------------------------------


def spectrum(delta: Adapter, specs: Sequence[ClientSpec], module: str | None = None) -> dict:
    """Singular values of one module's aggregated delta and, at each client rank r, the
    relative truncation error ``sqrt(sum_{i>r} s_i^2) / ||W||_F`` (FlexLoRA paper, fig. 6b).

    The module defaults to the first MLP-like one (largest ranks there), else the first."""
    if module is None:
        names = list(delta)
        module = next(
            (m for m in names if any(k in m for k in ("mlp", "up_proj", "intermediate"))), names[0]
        )
    f = delta[module]
    s = torch.linalg.svdvals(f.delta()) if f.rank else torch.zeros(0, dtype=torch.float64)
    total = float(s.square().sum())
    ranks = sorted({sp.ranks[module] for sp in specs if module in sp.ranks})
    errors = {
        str(r): (math.sqrt(float(s[r:].square().sum()) / total) if total > 0 else 0.0)
        for r in ranks
    }
    return {"module": module, "singular_values": s.tolist(), "truncation_error": errors}


def write_run_extras(run_dir: str | Path, delta: Adapter, specs, partition_summary) -> None:
    """Write ``spectrum.json`` and ``partition.json`` beside the run's metrics (and in its
    manifest)."""
    d = Path(run_dir)
    if delta:
        _write_json(d, "spectrum.json", spectrum(delta, specs))
    if partition_summary is not None:
        _write_json(d, "partition.json", partition_summary.as_dict())


def _write_json(run_dir: Path, name: str, data: Any) -> None:
    from fedlora.federation.checkpoint import atomic_write_text
    from fedlora.federation.runfiles import is_run_dir, write_output

    text = json.dumps(data) + "\n"
    if is_run_dir(run_dir):
        write_output(run_dir, name, lambda p: atomic_write_text(p, text))
    else:
        atomic_write_text(run_dir / name, text)


# -- tables ----------------------------------------------------------------------------------


def summary_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: final and best eval loss and headline metric on seen clients, unseen
    tasks, bytes up/down, ratio to full fine-tuning, wall time."""
    out = []
    for run in runs:
        rows, s = run["rows"], run["summary"] or {}
        metric = headline_metric(rows)
        row = {"run": run["name"], "metric": metric}
        for key in ("loss", metric):
            if key is None:
                continue
            for eval_set in ("seen_clients", "unseen_tasks", "unseen_clients"):
                _, ys = eval_curve(rows, key, eval_set)
                if not ys:
                    continue
                tag = "" if eval_set == "seen_clients" else f" ({eval_set.replace('_', ' ')})"
                row[f"final {key}{tag}"] = ys[-1]
                if eval_set == "seen_clients":
                    row[f"best {key}"] = min(ys) if key == "loss" else max(ys)
        row["bytes up"] = s.get("bytes_up")
        row["bytes down"] = s.get("bytes_down")
        row["vs full FT"] = s.get("comm_ratio_vs_full_ft")
        privacy = s.get("privacy") or {}
        if privacy:  # under DP: the run's (largest client's, in local mode) epsilon at its delta
            row["epsilon"] = privacy.get("epsilon")
        row["wall s"] = s.get("time_total")
        out.append(row)
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of `summary_rows` (columns: union of keys, in first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and k != "metric"]

    def cell(k, v):
        if v is None:
            return "-"
        if k.startswith("bytes"):
            return fmt_bytes(v)
        if k == "vs full FT":
            return f"{v:.2%}"
        if isinstance(v, float):
            return f"{v:.1f}" if k == "wall s" else f"{v:.4f}"
        return str(v)

    table = [[cell(k, r.get(k)) for k in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]

    def line(xs):
        return "  ".join(
            x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(xs, widths))
        )

    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(t) for t in table)])


# -- plots -----------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run: dict[str, Any], out_dir: str | Path | None = None) -> list[Path]:
    """The run's PNGs (`plot_figures`), in a run directory recorded in its manifest. Plots are
    optional: a write that fails (a full disk) is a warning, and the figures written so far are
    kept. Returns the written paths."""
    from fedlora.federation.runfiles import is_run_dir, write_output, wrote

    root = Path(out_dir or run["dir"])
    written: list[Path] = []
    try:
        if is_run_dir(root):
            write_output(root, "plots", lambda p: written.extend(plot_figures(run, p)))
        else:
            written = plot_figures(run, root / "plots")
    except OSError as e:
        where = e.filename or root / "plots"
        LOG.warning("plots not written: %s: %s (the run's results are intact)", where, e.strerror)
        if is_run_dir(root):  # the figures saved before the failure are the run's too
            wrote(root, *[p for p in written if p.is_file()])
    return written


def plot_figures(run: dict[str, Any], out: Path) -> list[Path]:
    """The run's PNGs in `out`: curves (eval loss and metric by round, 95% CI bands where
    recorded), communication per round, partition histogram and the singular-value
    spectrum. Returns the written paths."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    rows, written = run["rows"], []

    metric = headline_metric(rows)
    keys = ["loss"] + ([metric] if metric else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for eval_set in ("seen_clients", "unseen_clients", "unseen_tasks"):
            xs, ys = eval_curve(rows, key, eval_set)
            if xs:
                line = ax.plot(xs, ys, marker="o", label=eval_set.replace("_", " "))[0]
                bx, band = eval_curve(rows, f"{key}_ci95", eval_set)
                if bx == xs and all(b and b[0] is not None for b in band):
                    lo, hi = [b[0] for b in band], [b[1] for b in band]
                    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(xlabel="round", ylabel=key, title=f"global model: {key}")
        ax.legend()
    written.append(save_figure(fig, out / "curves.png"))

    rr = [r for r in rows if r.get("kind") == "round"]
    if rr:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        xs = [r["round"] for r in rr]
        ax.bar([x - 0.2 for x in xs], [r["bytes_down"] / 2**20 for r in rr], 0.4, label="down")
        ax.bar([x + 0.2 for x in xs], [r["bytes_up"] / 2**20 for r in rr], 0.4, label="up")
        ax.set(xlabel="round", ylabel="MiB (all sampled clients)", title="communication per round")
        ax.legend()
        written.append(save_figure(fig, out / "communication.png"))

    part = run.get("partition")
    if part:
        written.append(_plot_partition(plt, part, out / "partition.png"))
    spec = run.get("spectrum")
    if spec and spec["singular_values"]:
        written.append(_plot_spectrum(plt, spec, out / "spectrum.png"))
    return written


#: above this many clients the partition plot aggregates instead of drawing a bar per client
MAX_CLIENT_BARS = 200


def _plot_partition(plt, part: dict[str, Any], path: Path) -> Path:
    """Stacked bars: examples per client, split by label/task; past `MAX_CLIENT_BARS`
    clients, the distribution of client sizes and of examples per label/task instead (the
    figure and its cost stay the same whatever the number of clients)."""
    hist = part["histograms"]
    if len(hist) > MAX_CLIENT_BARS:
        return _plot_partition_summary(plt, part, path)
    clients = list(range(len(hist)))
    keys = sorted({k for h in hist for k in h}) if hist and isinstance(hist[0], dict) else []
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(clients) + 2), 3.8))
    bottom = [0] * len(clients)
    cmap = plt.get_cmap("tab20")
    for i, k in enumerate(keys):
        ys = [h.get(k, 0) for h in hist]
        ax.bar(clients, ys, bottom=bottom, color=cmap(i % 20), label=k if len(keys) <= 20 else None)
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set(xlabel="client", ylabel="examples", title=f"partition ({part.get('key', 'label')})")
    if 0 < len(keys) <= 20:
        ax.legend(fontsize=6, ncol=2, loc="upper right")
    return save_figure(fig, path)


def _plot_partition_summary(plt, part: dict[str, Any], path: Path) -> Path:
    hist = part["histograms"]
    sizes = part.get("sizes") or [sum(h.values()) for h in hist]
    totals: dict[str, int] = {}
    for h in hist:
        for k, v in h.items():
            totals[k] = totals.get(k, 0) + v
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.hist(sizes, bins=min(50, max(1, len(set(sizes)))))
    ax1.set(xlabel="examples per client", ylabel="clients", title=f"{len(hist)} clients")
    keys = sorted(totals, key=lambda k: -totals[k])[:30]
    ax2.bar(range(len(keys)), [totals[k] for k in keys])
    ax2.set_xticks(range(len(keys)), keys, rotation=90, fontsize=6)
    ax2.set(ylabel="examples", title=f"examples per {part.get('key', 'label')}")
    return save_figure(fig, path)


def _plot_spectrum(plt, spec: dict[str, Any], path: Path) -> Path:
    s = spec["singular_values"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.semilogy(range(1, len(s) + 1), [max(v, 1e-30) for v in s], label="singular value")
    ax.set(xlabel="index", ylabel="singular value", title=f"aggregated delta: {spec['module']}")
    ax2 = ax.twinx()
    for r, err in spec["truncation_error"].items():
        ax2.scatter([int(r)], [err], color="C3", zorder=3)
        ax2.annotate(
            f"r={r}: {err:.2f}",
            (int(r), err),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax2.set_ylabel("relative truncation error at client rank")
    ax2.set_ylim(0, 1.05)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() in ("round", "client"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
