#!/usr/bin/env python3
"""Rerun a fidelity study of docs/fidelity.md and rewrite its tables and figures.

    python scripts/fidelity.py lora_a2        # LoRA-A2 (Koo et al. 2024): MiniLM, wn_lexname
    python scripts/fidelity.py flexlora       # FlexLoRA (Bai et al. 2024): SmolLM2, per-task
    python scripts/fidelity.py flora          # FLoRA (Wang et al. 2024): SmolLM2, noise + ranks
    python scripts/fidelity.py all

Each study is a few `fedlora compare` runs (every strategy on the same partition, resources,
seeds and evaluation examples; `compare.json` gives each metric's mean, 95% CI and the paired
p-value against the baseline). Runs go to ``runs/fidelity/<study>/<cell>/`` and are resumed:
a rerun after an interruption continues where it stopped, and a finished cell is not rerun
(``--force`` reruns it). Then the study's section of docs/fidelity.md (between its
``<!-- fidelity:<study>:begin/end -->`` markers) and its figures in docs/fidelity/ are
rewritten from the runs, with the wall and CPU time they took (``--tables-only`` rebuilds them
from finished runs without training).

``--scale toy`` runs the same studies on the tiny random models in a minute, writing to
runs/fidelity-toy and /tmp/fidelity-toy.md: a check of the plumbing, not of the papers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "fidelity.md"
FIG_DIR = ROOT / "docs" / "fidelity"
LEVEL = 0.05  # significance level of the verdicts


# -- what a study runs -------------------------------------------------------------------------


@dataclass
class Cell:
    """One `fedlora compare` of a study: a preset, strategies and overrides."""

    key: str  # folder name under the study's run directory
    preset: str
    strategies: list[str]
    baseline: str
    seeds: list[int]
    overrides: dict[str, str]
    # runs another cell already made with this exact configuration (strategy -> cell key):
    # copied in and resumed, so a baseline that does not depend on the cell trains once
    reuse: dict[str, str] = field(default_factory=dict)


@dataclass
class Study:
    name: str
    title: str
    cells: list[Cell]
    render: Callable[[Study, Path, dict[str, Any]], str]  # markdown of the results section
    before: Callable[[Cell, Path, int | None], None] | None = None  # before a cell's compare


def _toml(value: Any) -> str:
    return json.dumps(value)


# LoRA-A2 ---------------------------------------------------------------------------------------
A2_METHODS = ["fedit", "ffa_lora", "flexlora", "lora_a2"]
A2_RANKS = [8, 2, 1]
A2_ALPHAS = [0.1, 0.01]
#: Koo et al. 2024, Table 2 (RoBERTa-base, BANKING77), accuracy % at ranks 8/4/2/1
A2_PAPER = {
    0.01: {
        "fedit": [60.96, 54.99, 49.08, 45.78],
        "ffa_lora": [40.88, 37.63, 34.44, 33.68],
        "flexlora": [69.84, 57.38, 55.24, 42.75],
        "lora_a2": [70.13, 69.63, 69.40, 68.88],
    },
    0.1: {
        "fedit": [90.47, 88.11, 85.59, 82.24],
        "ffa_lora": [77.44, 76.38, 73.44, 72.96],
        "flexlora": [92.14, 90.53, 87.31, 82.20],
        "lora_a2": [91.61, 91.43, 92.02, 91.87],
    },
}
PAPER_RANKS = [8, 4, 2, 1]
A2_NAMES = {"fedit": "FL+LoRA (fedit)", "ffa_lora": "FFA-LoRA", "flexlora": "FlexLoRA",
            "lora_a2": "LoRA-A2"}  # fmt: skip


def lora_a2_study(scale: str) -> Study:
    full = scale == "full"
    common = {
        "data.tasks": _toml(["wn_lexname"]),
        "data.partition": "dirichlet",
        "data.num_clients": "20",
        "data.test_fraction": "0.2",
        "resources.distribution": "homogeneous",
        "strategy.name": "lora_a2",
        # one global rank for every budget: a client uploads its r most important slots of 8
        "strategy.options": _toml({"global_rank": 8}),
        "rounds": "6" if full else "2",
        "clients_per_round": "4" if full else "3",
        "train.epochs": "none",  # a fixed number of steps: clients' data sizes vary 100-fold
        "train.local_steps": "2",
        "train.batch_size": "16" if full else "4",
        "train.max_length": "48",
        "train.precision": "fp32",  # pinned: "auto" would differ between CPUs
        "eval.every": "6" if full else "2",
        "eval.max_examples": "500" if full else "40",
        "eval.batch_size": "64" if full else "8",
        "eval.per_task": "false",
    }
    if not full:
        common |= {"model.name": "tiny-bert", "strategy.options": _toml({"global_rank": 4})}
    ranks = A2_RANKS if full else [4, 1]
    # the rank-drop claim first (Dir(0.01) at the largest and smallest rank), r=2 last
    order = [ranks[0], ranks[-1], *ranks[1:-1]]
    cells = [
        Cell(
            key=f"dir{alpha}-r{rank}",
            preset="lora_a2_paper",
            strategies=A2_METHODS,
            baseline="fedit",
            seeds=[0, 1],
            overrides={
                **common,
                "data.dirichlet_alpha": str(alpha),
                "resources.homogeneous_rank": str(rank),
            },
        )
        for rank in order
        for alpha in sorted(A2_ALPHAS)
    ]
    return Study("lora_a2", "LoRA-A2", cells, render_lora_a2)


# FlexLoRA ----------------------------------------------------------------------------------------


def smollm2_training(full: bool) -> dict[str, str]:
    """Rounds, local training and evaluation of the two SmolLM2 studies (one setting for every
    method): 4 rounds of 3 clients x 2 steps, loss on 64 examples, Rouge-L on 32 of them."""
    return {
        "rounds": "4" if full else "2",
        "clients_per_round": "3",
        "train.local_steps": "2" if full else "1",
        "train.batch_size": "4",
        "train.lr": "1e-3",
        "train.precision": "bf16",  # pinned: "auto" would differ between CPUs
        "train.max_length": "64" if full else "32",
        "eval.every": "4" if full else "2",
        "eval.metrics": _toml(["loss", "rouge_l"]),
        "eval.max_examples": "64" if full else "12",
        "eval.max_generations": "32" if full else "4",
        "eval.max_new_tokens": "16" if full else "4",
        "eval.batch_size": "16" if full else "4",
        "eval.per_task": "false",
    }


FLEX_DISTS = ["uniform", "heavy_tail_light", "heavy_tail_strong", "normal"]


def flexlora_study(scale: str) -> Study:
    full = scale == "full"
    common = {
        "data.num_clients": "24",  # 27 tasks less 3 held out: one task per client
        "data.max_examples_per_client": "64",
        **smollm2_training(full),
        "eval.seen_clients": "false",  # the paper scores unseen tasks only
    }
    if not full:
        common |= {"model.name": "tiny-llama"}
    cells = []
    for i, dist in enumerate(FLEX_DISTS):
        cells.append(
            Cell(
                key=dist,
                preset="flexlora_paper",
                strategies=["flexlora", "fedit", "hetlora"],  # the baseline before HetLoRA
                baseline="fedit",
                seeds=[0],
                overrides={**common, "resources.distribution": dist},
                # fedit runs every client at the type-1 rank whatever the distribution
                reuse={} if i == 0 else {"fedit": FLEX_DISTS[0]},
            )
        )
    return Study("flexlora", "FlexLoRA", cells, render_flexlora)


# FLoRA -------------------------------------------------------------------------------------------


def flora_study(scale: str) -> Study:
    full = scale == "full"
    common = {"data.max_examples_per_client": "64", **smollm2_training(full)}
    if not full:
        common |= {"model.name": "tiny-llama"}
    cells = [
        Cell(
            key="homogeneous",
            preset="flora_paper",
            # zero-padding with equal ranks is FedIT (the toy run gives identical numbers)
            strategies=["flora", "fedit"],
            baseline="fedit",
            seeds=[0],
            overrides={
                **common,
                "resources.distribution": "homogeneous",
                "resources.homogeneous_rank": "8",
            },
        ),
        Cell(
            key="heterogeneous",
            preset="flora_paper",
            strategies=["flora", "zero_pad"],
            baseline="zero_pad",
            seeds=[0],
            overrides=common,  # the preset's ranks 4 / 8 / 16 / 32, uniform over clients
        ),
    ]
    return Study("flora", "FLoRA", cells, render_flora, before=fedit_noise_run)


STUDIES = {"lora_a2": lora_a2_study, "flexlora": flexlora_study, "flora": flora_study}


# -- running -------------------------------------------------------------------------------------


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / cell.key


def run_dir(out: Path, cell: Cell, strategy: str, seed: int) -> Path:
    """Where `fedlora compare` puts a run (one sub-folder per seed when there are several)."""
    base = cell_dir(out, cell)
    return (base / f"seed{seed}" if len(cell.seeds) > 1 else base) / strategy


def compare_command(cell: Cell, out: Path, threads: int | None = None) -> list[str]:
    cmd = [
        sys.executable, "-m", "fedlora.cli", "compare", "-q", "--resume",
        "--preset", cell.preset,
        "--strategies", ",".join(cell.strategies),
        "--baseline", cell.baseline,
        "--seeds", ",".join(map(str, cell.seeds)),
        "--output-dir", str(cell_dir(out, cell)),
    ]  # fmt: skip
    for key, value in cell.overrides.items():
        cmd += ["--set", f"{key}={value}"]
    if threads is not None:  # not part of a run's configuration: resuming ignores it
        cmd += ["--set", f"threads={threads}"]
    return cmd


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_cell(
    study: Study, cell: Cell, out: Path, force: bool, dry_run: bool, threads: int | None
) -> dict | None:
    """Run one cell (resuming), unless its compare.json exists; returns its timing."""
    done = cell_dir(out, cell) / "compare.json"
    if done.is_file() and not force:
        print(f"[{study.name}/{cell.key}] finished earlier ({done}); --force reruns it")
        return None
    cmd = compare_command(cell, out, threads)
    print(f"[{study.name}/{cell.key}] " + " ".join(cmd[1:]), flush=True)
    if dry_run:
        return None
    for strategy, source in cell.reuse.items():
        for seed in cell.seeds:
            src = run_dir(out, _cell(study, source), strategy, seed)
            dst = run_dir(out, cell, strategy, seed)
            if (src / "summary.json").is_file() and not dst.exists():
                shutil.copytree(src, dst)  # resumed by compare: checked against its config
    lock = cell_dir(out, cell) / ".running"
    if _held(lock):
        print(f"[{study.name}/{cell.key}] another process runs it ({lock}); skipped")
        return None
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(str(os.getpid()))
    t0, c0, s0 = time.perf_counter(), _cpu_children(), _cpu_self()
    try:
        if study.before is not None:
            study.before(cell, out, threads)
        subprocess.run(cmd, check=True, cwd=ROOT)
    finally:
        lock.unlink(missing_ok=True)
    return {
        "wall_s": time.perf_counter() - t0,
        "cpu_s": _cpu_children() - c0 + _cpu_self() - s0,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_avg": os.getloadavg(),
        "threads": threads or os.cpu_count(),
    }


def _held(lock: Path) -> bool:
    """Whether a live process (other than this one) holds the cell's lock file."""
    try:
        pid = int(lock.read_text())
        if pid == os.getpid():
            return False
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _cell(study: Study, key: str) -> Cell:
    return next(c for c in study.cells if c.key == key)


def run_study(
    study: Study,
    out: Path,
    force: bool,
    dry_run: bool,
    threads: int | None,
    only: Sequence[str] | None = None,
) -> None:
    timing_path = out / "timing.json"
    for cell in study.cells:
        if only and cell.key not in only:
            continue
        t = run_cell(study, cell, out, force, dry_run, threads)
        if t is not None:  # reread: another process may run other cells of the study
            timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
            timing[cell.key] = t
            out.mkdir(parents=True, exist_ok=True)
            timing_path.write_text(json.dumps(timing, indent=1) + "\n")


# -- FLoRA: FedIT's aggregation noise in a real run ----------------------------------------------


NOISE_FILE = "aggregation_noise.jsonl"


def fedit_noise_run(cell: Cell, out: Path, threads: int | None) -> None:
    """Train the cell's fedit runs here (the configuration `fedlora compare` would build), and
    record per round and module `aggregation_noise` of the round's updates; compare then
    resumes them as finished."""
    if "fedit" not in cell.strategies:
        return
    from fedlora.engine import run_experiment
    from fedlora.federation.config import load_config
    from fedlora.strategies.fedit import aggregation_noise

    for seed in cell.seeds:
        where = run_dir(out, cell, "fedit", seed)
        if (where / NOISE_FILE).is_file() and (where / "summary.json").is_file():
            continue
        base = load_config(cell.preset, dict(cell.overrides))
        extra: dict[str, Any] = {
            "strategy.name": "fedit",
            "output_dir": str(where),
            "name": f"{base.name}-fedit",
            "seed": seed,
        }
        if base.strategy.name != "fedit":
            extra["strategy.options"] = {}
        if threads is not None:
            extra["threads"] = threads
        cfg = load_config(cell.preset, {**cell.overrides, **extra})
        probe = NoiseProbe(aggregation_noise)
        shutil.rmtree(where, ignore_errors=True)  # a partial run: its noise rows are lost
        run_experiment(cfg, progress=False, on_update=probe.keep, on_round_end=probe.measure)
        (where / NOISE_FILE).write_text("".join(json.dumps(r) + "\n" for r in probe.rows))


class NoiseProbe:
    """Engine callbacks: keep a round's updates, then record their aggregation noise."""

    def __init__(self, noise: Callable[[list], dict[str, float]]) -> None:
        self.noise = noise
        self.updates: list = []
        self.rows: list[dict[str, Any]] = []

    def keep(self, rnd: int, spec: Any, update: Any) -> None:
        self.updates.append(update)

    def measure(self, rnd: int, result: Any) -> None:
        self.rows.append(
            {"round": rnd, "clients": len(self.updates), "noise": self.noise(self.updates)}
        )
        self.updates.clear()


# -- reading results ---------------------------------------------------------------------------


def load_compare(out: Path, cell: Cell) -> dict[str, Any] | None:
    """The cell's compare.json; for a cell stopped before its last run, the comparison of its
    finished runs (``partial`` lists the runs missing), written by `fedlora report` to
    ``<cell>/partial/``; None when fewer than the baseline and one other run finished."""
    p = cell_dir(out, cell) / "compare.json"
    if p.is_file():
        result = json.loads(p.read_text())
        if result.get("strategies"):
            return result
    finished = {
        (st, k)
        for st in cell.strategies
        for k in cell.seeds
        if (run_dir(out, cell, st, k) / "summary.json").is_file()
    }
    base_seeds = [k for k in cell.seeds if (cell.baseline, k) in finished]
    # the seeds and strategies to compare: every strategy kept has all the kept seeds, so
    # the paired tests cover the same seeds; prefer more strategies, then more seeds
    best: tuple[list[str], list[int]] = ([], [])
    for seeds in [base_seeds, *([k] for k in base_seeds)]:
        if not seeds:
            continue
        strategies = [st for st in cell.strategies if all((st, k) in finished for k in seeds)]
        if (len(strategies), len(seeds)) > (len(best[0]), len(best[1])):
            best = (strategies, seeds)
    full, seeds = best
    if len(full) < 2:
        return None
    done = [(st, k, run_dir(out, cell, st, k)) for st in full for k in seeds]
    missing = [(st, k, None) for st in cell.strategies for k in cell.seeds
               if (st, k) not in {(a, b) for a, b, _ in done}]  # fmt: skip
    target = cell_dir(out, cell) / "partial"
    dirs = [str(d) for _, _, d in done]
    cmd = [sys.executable, "-m", "fedlora.cli", "report", "-q", *dirs,
           "--output-dir", str(target), "--baseline", cell.baseline]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    result = json.loads((target / "compare.json").read_text())
    result["partial"] = [f"{st} seed {k}" for st, k, _ in missing]
    return result


def partial_note(results: dict[str, dict[str, Any] | None]) -> str:
    """A line naming the runs that had not finished when the tables were made."""
    notes = [f"{key}: {', '.join(r['partial'])}" for key, r in results.items()
             if r and r.get("partial")]  # fmt: skip
    missing = [key for key, r in results.items() if r is None]
    parts = []
    if notes:
        parts.append("runs not finished in time, left out: " + "; ".join(notes))
    if missing:
        parts.append("cells with no comparison (not run, or too few runs finished): "
                     + ", ".join(missing))  # fmt: skip
    return ("**Incomplete.** " + ". ".join(parts) + ".") if parts else ""


def metric(result: dict[str, Any], label: str, key: str) -> dict[str, Any] | None:
    entry = result["strategies"].get(label)
    return None if entry is None else entry["metrics"].get(key)


def label_of(result: dict[str, Any], strategy: str) -> str | None:
    for label, entry in result["strategies"].items():
        if entry["strategy"] == strategy:
            return label
    return None


def fmt_ci(m: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    if not m or m.get("mean") is None:
        return "–"
    ci = m.get("ci95") or [None, None]
    s = f"{m['mean'] * scale:.{digits}f}"
    if ci[0] is not None:
        s += f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"
    return s


def fmt_diff(m: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    if not m or m.get("diff") is None:
        return "–"
    p = m["p_value"]
    star = "*" if p is not None and p < LEVEL else ""
    ptext = "p=?" if p is None else "p<0.001" if p < 0.001 else f"p={p:.3f}"
    return f"{m['diff'] * scale:+.{digits}f} ({ptext}){star}"


def verdict(m: dict[str, Any], lower_is_better: bool) -> str:
    """holds / reversed (both significant) / not significant, for "run beats the baseline"."""
    better = m["diff"] < 0 if lower_is_better else m["diff"] > 0
    if m["p_value"] is None or m["p_value"] >= LEVEL or m["diff"] == 0:
        return "not significant"
    return "holds" if better else "reversed"


def rerun_drop(runs_a: list[Path], runs_b: list[Path], key: str) -> dict[str, Any] | None:
    """Paired difference b - a of one metric between two runs of one strategy on the same
    seeds and examples (e.g. rank 1 against rank 8), from `fedlora.cli.comparison`."""
    from fedlora.cli import comparison, report

    runs = []
    for tag, dirs in (("a", runs_a), ("b", runs_b)):
        for d in dirs:
            if not (d / "summary.json").is_file():  # not finished
                return None
            run = report.load_run(d)
            run["name"] = tag
            runs.append(run)
    result = comparison.compare(runs, baseline="a")
    return result["strategies"]["b"]["metrics"].get(key)


def timing_line(out: Path, cells: Sequence[Cell]) -> str:
    p = out / "timing.json"
    timing = json.loads(p.read_text()) if p.is_file() else {}
    got = [timing[c.key] for c in cells if c.key in timing]
    runs = [
        json.loads((run_dir(out, c, s, k) / "summary.json").read_text())
        for c in cells
        for s in c.strategies
        for k in c.seeds
        if (run_dir(out, c, s, k) / "summary.json").is_file()
    ]
    total = len({(c.key, s, k) for c in cells for s in c.strategies for k in c.seeds})
    rounds = sum(r.get("time_total", 0.0) for r in runs)
    line = (
        f"{len(runs)} of {total} runs finished; their rounds (training, aggregation, "
        f"evaluation; model loading and plots excluded) took {rounds / 60:.1f} min of wall time"
    )
    if not got:
        return line + "."
    wall = sum(t["wall_s"] for t in got)
    cpu = sum(t["cpu_s"] for t in got)
    loads = [t["load_avg"][0] for t in got]
    threads = sorted({t.get("threads", 0) for t in got})
    return (
        f"{line}. Cells run to the end: {len(got)} of {len(cells)}, {wall / 60:.1f} min of wall "
        f"time, {cpu / 60:.1f} CPU-minutes (torch threads per run: "
        f"{', '.join(map(str, threads))}; the machine was shared, 1-minute load average "
        f"{min(loads):.1f}-{max(loads):.1f} at the end of the cells; finished "
        f"{max(t['finished'] for t in got)})."
    )


def hardware_line() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def setting_line(cell: Cell) -> str:
    keep = [f"`{k}={v}`" for k, v in cell.overrides.items() if k != "strategy.options"]
    return f"preset `{cell.preset}` with " + ", ".join(keep)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_path(name: str, ctx: dict[str, Any]) -> Path:
    d = ctx["fig_dir"]
    d.mkdir(parents=True, exist_ok=True)
    return d / name


def rel(path: Path, ctx: dict[str, Any]) -> str:
    return os.path.relpath(path, ctx["doc"].parent)


# -- LoRA-A2 tables ------------------------------------------------------------------------------


def render_lora_a2(study: Study, out: Path, ctx: dict[str, Any]) -> str:
    key = "seen_clients/accuracy"
    results = {c.key: load_compare(out, c) for c in study.cells}
    ranks = sorted({int(c.overrides["resources.homogeneous_rank"]) for c in study.cells})[::-1]
    alphas = sorted({float(c.overrides["data.dirichlet_alpha"]) for c in study.cells})[::-1]
    lines = []
    for alpha in alphas:
        head = ["method"]
        for r in ranks:
            head += [f"r={r} ours", f"r={r} paper"]
        head += [f"r={ranks[0]}→{ranks[-1]} ours (p)", "paper"]
        rows = []
        for method in A2_METHODS:
            row = [A2_NAMES[method]]
            for r in ranks:
                res = results.get(f"dir{alpha}-r{r}")
                m = metric(res, label_of(res, method) or method, key) if res else None
                row.append(fmt_ci(m, 100))
                paper = A2_PAPER[alpha][method]
                row.append(f"{paper[PAPER_RANKS.index(r)]:.2f}" if r in PAPER_RANKS else "–")
            drop = _rank_drop(study, out, alpha, ranks[0], ranks[-1], method, key)
            row.append(fmt_diff(drop, 100))
            paper = A2_PAPER[alpha][method]
            if ranks[0] in PAPER_RANKS and ranks[-1] in PAPER_RANKS:
                pdrop = paper[PAPER_RANKS.index(ranks[-1])] - paper[PAPER_RANKS.index(ranks[0])]
                row.append(f"{pdrop:+.2f}")
            else:
                row.append("–")
            rows.append(row)
        lines.append(f"**Dir({alpha})**: accuracy % on the seen clients' test examples, mean "
                     "over seeds [95% bootstrap CI]; paper: BANKING77, RoBERTa-base")  # fmt: skip
        lines.append("")
        lines.append(md_table(head, rows))
        lines.append("")
        lines.append(_a2_significance(results, alpha, ranks, key))
        lines.append("")
    lines.append(_a2_claims(study, out, results, alphas, ranks, key))
    lines.append("")
    lines.append(partial_note(results))
    lines.append("")
    path = _plot_lora_a2(results, alphas, ranks, key, ctx)
    if path:
        lines.append(f"![accuracy by rank]({rel(path, ctx)})")
        lines.append("")
    first = study.cells[0]
    lines.append(f"Setting: {setting_line(first)}; cells vary `data.dirichlet_alpha` and "
                 "`resources.homogeneous_rank`; lora_a2 runs with global rank "
                 f"{json.loads(first.overrides['strategy.options'])['global_rank']}. Seeds "
                 f"{', '.join(map(str, first.seeds))}.")  # fmt: skip
    lines.append("")
    lines.append(timing_line(out, study.cells))
    return "\n".join(lines)


def _rank_drop(study, out, alpha, r_hi, r_lo, method, key):
    hi = next((c for c in study.cells if c.key == f"dir{alpha}-r{r_hi}"), None)
    lo = next((c for c in study.cells if c.key == f"dir{alpha}-r{r_lo}"), None)
    if hi is None or lo is None:
        return None
    return rerun_drop(
        [run_dir(out, hi, method, s) for s in hi.seeds],
        [run_dir(out, lo, method, s) for s in lo.seeds],
        key,
    )


def _a2_significance(results, alpha, ranks, key) -> str:
    parts = []
    for r in ranks:
        res = results.get(f"dir{alpha}-r{r}")
        if not res:
            continue
        cells = []
        for method in A2_METHODS[1:]:
            m = metric(res, label_of(res, method) or method, key)
            cells.append(f"{A2_NAMES[method]} {fmt_diff(m, 100)}")
        parts.append(f"r={r}: " + ", ".join(cells))
    return "Against FL+LoRA, accuracy points (paired permutation p; * p < 0.05): " + "; ".join(
        parts
    )


def _a2_claims(study, out, results, alphas, ranks, key) -> str:
    rows = []
    lo_alpha, hi_alpha = min(alphas), max(alphas)
    drops = {m: _rank_drop(study, out, lo_alpha, ranks[0], ranks[-1], m, key) for m in A2_METHODS}
    a2 = drops["lora_a2"]
    others = {m: d for m, d in drops.items() if m != "lora_a2"}
    if a2 and all(others.values()):
        holds_a2 = a2["p_value"] is not None and (a2["p_value"] >= LEVEL or a2["diff"] >= 0)
        fall = [m for m, d in others.items() if d["diff"] < 0 and d["p_value"] < LEVEL]
        smaller = all(a2["diff"] > d["diff"] for d in others.values())
        verdict = (
            "holds"
            if holds_a2 and len(fall) == len(others) and smaller
            else "partly"
            if smaller or holds_a2
            else "does not hold"
        )
        rows.append(
            [
                f"Dir({lo_alpha}): LoRA-A2 keeps its accuracy from r={ranks[0]} to "
                f"r={ranks[-1]}, the others fall",
                "LoRA-A2 −1.3 pts, others −9 to −27 (r 8→1)",
                f"LoRA-A2 {fmt_diff(a2, 100)}; "
                + ", ".join(f"{A2_NAMES[m]} {fmt_diff(d, 100)}" for m, d in others.items()),
                verdict,
            ]
        )
    for alpha in (lo_alpha, hi_alpha):
        worst = []
        for r in ranks:
            res = results.get(f"dir{alpha}-r{r}")
            if not res:
                continue
            ffa = metric(res, label_of(res, "ffa_lora") or "ffa_lora", key)
            means = {
                m: (metric(res, label_of(res, m) or m, key) or {}).get("mean") for m in A2_METHODS
            }
            if ffa and all(v is not None for v in means.values()):
                lowest = min(means, key=lambda m: means[m]) == "ffa_lora"
                sig = ffa.get("p_value") is not None and ffa["p_value"] < LEVEL and ffa["diff"] < 0
                worst.append((r, lowest, sig))
        if worst:
            n_low = sum(w[1] for w in worst)
            n_sig = sum(w[1] and w[2] for w in worst)
            rows.append(
                [
                    f"Dir({alpha}): FFA-LoRA trails",
                    "lowest at every rank",
                    f"lowest at {n_low} of {len(worst)} ranks, significantly below FL+LoRA "
                    f"at {n_sig}",
                    "holds" if n_sig == len(worst) else "partly" if n_low else "does not hold",
                ]
            )
    spread = []
    for r in ranks:
        res = results.get(f"dir{hi_alpha}-r{r}")
        if not res:
            continue
        means = [(metric(res, label_of(res, m) or m, key) or {}).get("mean") for m in A2_METHODS]
        if all(v is not None for v in means):
            spread.append((r, 100 * (max(means) - min(means))))
    lo_spread = []
    for r in ranks:
        res = results.get(f"dir{lo_alpha}-r{r}")
        if not res:
            continue
        means = [(metric(res, label_of(res, m) or m, key) or {}).get("mean") for m in A2_METHODS]
        if all(v is not None for v in means):
            lo_spread.append(100 * (max(means) - min(means)))
    if spread:
        worst = max(s for _, s in spread)
        rows.append(
            [
                f"Dir({hi_alpha}): all methods close (except FFA-LoRA in the paper)",
                "spread 9-19 pts with FFA, 1-10 without",
                "spread (max - min over methods) "
                + ", ".join(f"r={r}: {s:.1f} pts" for r, s in spread)
                + (f"; Dir({lo_alpha}): " + ", ".join(f"{s:.1f}" for s in lo_spread)),
                "–" if not lo_spread else "holds" if worst < min(lo_spread) else "does not hold",
            ]
        )
    return md_table(["claim", "paper", "ours", "verdict"], rows)


def _plot_lora_a2(results, alphas, ranks, key, ctx) -> Path | None:
    if not any(results.values()):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(alphas), figsize=(5 * len(alphas), 3.6), squeeze=False)
    for ax, alpha in zip(axes[0], alphas):
        for i, method in enumerate(A2_METHODS):
            xs, ys, lo, hi = [], [], [], []
            for r in ranks:
                res = results.get(f"dir{alpha}-r{r}")
                m = metric(res, label_of(res, method) or method, key) if res else None
                if m and m.get("mean") is not None:
                    xs.append(r)
                    ys.append(100 * m["mean"])
                    ci = m.get("ci95") or [m["mean"], m["mean"]]
                    lo.append(100 * (m["mean"] - ci[0]))
                    hi.append(100 * (ci[1] - m["mean"]))
            color = f"C{i}"
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", color=color, capsize=3,
                        label=f"{A2_NAMES[method]} (ours)")  # fmt: skip
            paper = A2_PAPER[alpha][method]
            ax.plot(PAPER_RANKS, paper, ls="--", color=color, alpha=0.5,
                    label=f"{A2_NAMES[method]} (paper)")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(PAPER_RANKS, [str(r) for r in PAPER_RANKS])
        ax.set_xlabel("LoRA rank (LoRA-A2: upload budget)")
        ax.set_ylabel("accuracy %")
        ax.set_title(f"Dir({alpha})")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="lower right", ncol=2)
    fig.tight_layout()
    path = fig_path("lora_a2_accuracy.png", ctx)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- FlexLoRA tables -------------------------------------------------------------------------------


def render_flexlora(study: Study, out: Path, ctx: dict[str, Any]) -> str:
    keys = [("unseen_tasks/loss", "loss", 1, 3), ("unseen_tasks/rouge_l", "Rouge-L %", 100, 1)]
    methods = ["fedit", "flexlora", "hetlora"]
    names = {"fedit": "FedIT, homogeneous type-1 rank", "flexlora": "FlexLoRA",
             "hetlora": "HetLoRA"}  # fmt: skip
    lines = []
    results = {c.key: load_compare(out, c) for c in study.cells}
    for key, title, scale, digits in keys:
        head = ["distribution"] + [names[m] for m in methods]
        head += [f"{names[m]} − FedIT (p)" for m in methods[1:]]
        rows = []
        for cell in study.cells:
            res = results.get(cell.key)
            row = [cell.key]
            ms = {m: metric(res, label_of(res, m) or m, key) if res else None for m in methods}
            row += [fmt_ci(ms[m], scale, digits) for m in methods]
            row += [fmt_diff(ms[m], scale, digits) for m in methods[1:]]
            rows.append(row)
        lines.append(f"**Unseen tasks, {title}** (mean [95% bootstrap CI over examples]; "
                     "* p < 0.05, paired permutation against FedIT)")  # fmt: skip
        lines.append("")
        lines.append(md_table(head, rows))
        lines.append("")
    lines.append(_flex_claims(study, results))
    lines.append("")
    lines.append(partial_note(results))
    lines.append("")
    path = _plot_bars(study, results, methods, names, keys, "flexlora_unseen.png", ctx)
    if path:
        lines.append(f"![unseen-task loss and Rouge-L by distribution]({rel(path, ctx)})")
        lines.append("")
    first = study.cells[0]
    lines.append(f"Setting: {setting_line(first)}; cells vary `resources.distribution`. "
                 f"Seeds {', '.join(map(str, first.seeds))}; FedIT's runs are the same in every "
                 "distribution (every client at the type-1 rank) and trained once.")  # fmt: skip
    lines.append("")
    lines.append(timing_line(out, study.cells))
    return "\n".join(lines)


def _flex_claims(study, results) -> str:
    rows = []
    for key, lower in (("unseen_tasks/loss", True), ("unseen_tasks/rouge_l", False)):
        wins = sig = worse = between = n = n_het = 0
        for cell in study.cells:
            res = results.get(cell.key)
            if not res:
                continue
            f = metric(res, label_of(res, "flexlora") or "flexlora", key)
            h = metric(res, label_of(res, "hetlora") or "hetlora", key)
            if not f or f.get("diff") is None:
                continue
            n += 1
            v = verdict(f, lower)
            wins += (f["diff"] < 0) if lower else (f["diff"] > 0)
            sig += v == "holds"
            worse += v == "reversed"
            if h and h.get("diff") is not None:
                n_het += 1
                lo, hi = sorted((0.0, f["diff"]))
                between += lo < h["diff"] < hi
        if n:
            rows.append(
                [
                    f"FlexLoRA beats homogeneous FedIT ({key.split('/')[1]})",
                    "all four distributions, up to +3.1% Rouge-L",
                    f"better in {wins} of {n} distributions, significantly in {sig}; "
                    f"significantly worse in {worse}",
                    "holds" if sig == n else "partly" if sig else "does not hold",
                ]
            )
        if n_het:
            rows.append(
                [
                    f"HetLoRA between FedIT and FlexLoRA ({key.split('/')[1]})",
                    "yes",
                    f"in {between} of {n_het} distributions",
                    "holds" if between == n_het else "partly" if between else "does not hold",
                ]
            )
    return md_table(["claim", "paper", "ours", "verdict"], rows)


def _plot_bars(study, results, methods, names, keys, fname, ctx) -> Path | None:
    if not any(results.values()):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.4), squeeze=False)
    cells = [c for c in study.cells if results.get(c.key)]
    width = 0.8 / len(methods)
    for ax, (key, title, scale, _) in zip(axes[0], keys):
        for i, m in enumerate(methods):
            ys, lo, hi, xs = [], [], [], []
            for j, cell in enumerate(cells):
                res = results[cell.key]
                mm = metric(res, label_of(res, m) or m, key)
                if not mm or mm.get("mean") is None:
                    continue
                ci = mm.get("ci95") or [mm["mean"], mm["mean"]]
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(scale * mm["mean"])
                lo.append(scale * (mm["mean"] - ci[0]))
                hi.append(scale * (ci[1] - mm["mean"]))
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=names[m], color=f"C{i}")
        ax.set_xticks(range(len(cells)), [c.key for c in cells], fontsize=7)
        ax.set_title(f"{key.replace('/', ': ')}")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = fig_path(fname, ctx)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- FLoRA tables ----------------------------------------------------------------------------------


def module_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def render_flora(study: Study, out: Path, ctx: dict[str, Any]) -> str:
    lines = []
    homo = _cell(study, "homogeneous")
    noise_rows = []
    for seed in homo.seeds:
        p = run_dir(out, homo, "fedit", seed) / NOISE_FILE
        if p.is_file():
            noise_rows += [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    if noise_rows:
        import numpy as np

        kinds = sorted({module_kind(m) for m in noise_rows[0]["noise"]})
        head = ["round", "clients", "mean", "median", "min", "max"] + kinds
        rows = []
        for r in noise_rows:
            v = np.array(list(r["noise"].values()))
            by_kind = [
                np.mean([x for m, x in r["noise"].items() if module_kind(m) == k]) for k in kinds
            ]
            rows.append(
                [str(r["round"]), str(r["clients"])]
                + [f"{x:.2e}" for x in (v.mean(), np.median(v), v.min(), v.max())]
                + [f"{x:.2e}" for x in by_kind]
            )
        lines.append(
            "**FedIT's aggregation noise** in the homogeneous run: per round, "
            "`||mean(B) mean(A) − mean(B A)||_F / ||mean(B A)||_F` over the round's updates "
            "(`fedlora.strategies.fedit.aggregation_noise`), over its "
            f"{len(noise_rows[0]['noise'])} modules (mean per module kind on the right)"
        )
        lines.append("")
        lines.append(md_table(head, rows))
        lines.append("")
        path = _plot_noise(noise_rows, kinds, ctx)
        lines.append(f"![aggregation noise by round]({rel(path, ctx)})")
        lines.append("")
    keys = [("seen_clients/loss", "loss", 1, 3), ("seen_clients/rouge_l", "Rouge-L %", 100, 1)]
    names = {"flora": "FLoRA", "zero_pad": "zero-padding", "fedit": "FedIT"}
    results = {c.key: load_compare(out, c) for c in study.cells}
    for cell in study.cells:
        res = results[cell.key]
        head = ["method"] + [t for _, t, _, _ in keys] + [f"{t} − {names[cell.baseline]} (p)"
                                                          for _, t, _, _ in keys]  # fmt: skip
        rows = []
        for m in cell.strategies:
            ms = [metric(res, label_of(res, m) or m, k) if res else None for k, *_ in keys]
            rows.append(
                [names[m]]
                + [fmt_ci(x, s, d) for x, (_, _, s, d) in zip(ms, keys)]
                + [fmt_diff(x, s, d) for x, (_, _, s, d) in zip(ms, keys)]
            )
        lines.append(f"**{cell.key.capitalize()} ranks** ({_ranks_text(cell)}), seen clients' "
                     "test examples")  # fmt: skip
        lines.append("")
        lines.append(md_table(head, rows))
        lines.append("")
    lines.append(_flora_claims(results))
    lines.append("")
    lines.append(partial_note(results))
    lines.append("")
    lines.append(f"Setting: {setting_line(homo)}. Seeds {', '.join(map(str, homo.seeds))}.")
    lines.append("")
    lines.append(timing_line(out, study.cells))
    return "\n".join(lines)


def _ranks_text(cell: Cell) -> str:
    if cell.overrides.get("resources.distribution") == "homogeneous":
        return f"rank {cell.overrides['resources.homogeneous_rank']} everywhere"
    return "the preset's ranks 4 / 8 / 16 / 32 spread uniformly over clients"


def _flora_claims(results: dict[str, dict[str, Any] | None]) -> str:
    rows = []
    for cell, other in (("homogeneous", "fedit"), ("heterogeneous", "zero_pad")):
        res = results.get(cell)
        if not res:
            continue
        for key, lower in (("seen_clients/loss", True), ("seen_clients/rouge_l", False)):
            m = metric(res, label_of(res, "flora") or "flora", key)
            if not m or m.get("diff") is None:
                continue
            rows.append(
                [
                    f"{cell}: FLoRA beats {other} ({key.split('/')[1]})",
                    "yes (MMLU / MT-bench, Llama models)",
                    fmt_diff(m, 1 if lower else 100, 3 if lower else 1),
                    verdict(m, lower),
                ]
            )
    return md_table(["claim", "paper", "ours", "verdict"], rows)


def _plot_noise(rows, kinds, ctx) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    rounds = [r["round"] for r in rows]
    for i, k in enumerate(kinds):
        ys = [
            sum(x for m, x in r["noise"].items() if module_kind(m) == k)
            / max(1, sum(1 for m in r["noise"] if module_kind(m) == k))
            for r in rows
        ]
        ax.plot(rounds, ys, marker="o", label=k, color=f"C{i}")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("relative error of FedIT's aggregate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = fig_path("flora_noise.png", ctx)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the document ------------------------------------------------------------------------------


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with the part between ``<!-- fidelity:NAME:begin/end -->`` set to `body` (the
    markers are appended when missing)."""
    begin, end = f"<!-- fidelity:{name}:begin -->", f"<!-- fidelity:{name}:end -->"
    if begin not in text or end not in text:
        return f"{text.rstrip()}\n\n{begin}\n{body}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def write_section(study: Study, out: Path, doc: Path, fig_dir: Path) -> None:
    ctx = {"doc": doc, "fig_dir": fig_dir}
    body = study.render(study, out, ctx)
    stamp = f"_Generated by `python scripts/fidelity.py {study.name}` on {hardware_line()}._"
    body = f"{stamp}\n\n{body}"
    text = doc.read_text() if doc.is_file() else "# Fidelity (generated sections)\n"
    doc.write_text(replace_section(text, study.name, body))
    print(f"[{study.name}] wrote its section of {doc} (figures in {fig_dir})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=[*STUDIES, "all"])
    ap.add_argument("--scale", choices=["full", "toy"], default="full")
    ap.add_argument("--out", type=Path, help="run directory root (default runs/fidelity)")
    ap.add_argument("--doc", type=Path, help="the document to rewrite (default docs/fidelity.md)")
    ap.add_argument("--force", action="store_true", help="rerun finished cells")
    ap.add_argument("--tables-only", action="store_true", help="only rebuild tables and figures")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument(
        "--cells",
        help="comma-separated cell names to run (default: all; e.g. to split a study over "
        "processes)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        help="torch threads per run (default: all cores; 1 wastes less on a shared machine)",
    )
    args = ap.parse_args(argv)
    toy = args.scale == "toy"
    root = args.out or ROOT / ("runs/fidelity-toy" if toy else "runs/fidelity")
    doc = args.doc or (Path("/tmp/fidelity-toy.md") if toy else DOC)
    fig_dir = doc.parent / "fidelity" if toy or args.doc else FIG_DIR
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    names = list(STUDIES) if args.study == "all" else [args.study]
    for name in names:
        study = STUDIES[name](args.scale)
        out = root / name
        if not args.tables_only:
            only = args.cells.split(",") if args.cells else None
            run_study(study, out, args.force, args.dry_run, args.threads, only)
        if not args.dry_run:
            write_section(study, out, doc, fig_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
