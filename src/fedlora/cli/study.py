"""Paper reproductions as data: a study file says what to run, one tested runner runs it.

A study (``fedlora/cli/studies/<name>.toml``) names a preset, the runs it compares (a label, a
strategy and its overrides), the cells (one setting each: the product of its ``[[axis]]``
entries, or ``[[cell]]`` entries listed one by one), the seeds, the headline metric, the
paper's claims as pairs of runs, floors a baseline must reach before a verdict means
anything, and ``[[check]]`` comparisons of diagnostic runs (pairs like claims, tabulated with
their CI and p but given no verdict: they test no claim of the paper). ``[scale.<name>]``
adds overrides (``toy``: tiny random models for CI; ``gpu``: the ``cpu`` study on CUDA with
several clients in one pass).

A *unit* is one training run: (cell, run label, seed). Its compact result (`compact_result`: a
few KB of settings, hardware, time, learning curve and the last evaluation's per-example
columns) is what gets committed; every table and verdict (`render_study`) is computed from
those files alone, so ``fedlora reproduce STUDY --tables-only`` rebuilds the page exactly.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fedlora.cli import comparison
from fedlora.core.contract import FedLoraError
from fedlora.federation.config import tomllib

SCALES = ("toy", "cpu", "gpu")
LEVEL = 0.05  # significance level of a verdict
_DIGITS = 6  # significant digits kept of per-example values in a compact result


@dataclass(frozen=True)
class Unit:
    """One training run of a study: its cell, run label, strategy, seed and overrides."""

    study: str
    cell: str
    label: str
    strategy: str
    seed: int
    overrides: dict[str, Any]
    untrained: bool = False  # evaluate the model before any training (`fedlora.cli.untrained`)

    @property
    def key(self) -> str:
        return f"{self.cell}/{self.label}-seed{self.seed}"


@dataclass
class Study:
    """A parsed study file at one scale (see the module docstring)."""

    name: str
    title: str
    preset: str
    scale: str
    seeds: list[int]
    metric: str
    baseline: str
    runs: dict[str, dict[str, Any]]  # label -> {"strategy", "set", "name"}
    cells: list[dict[str, Any]]  # {"name", "set", "runs", "baseline"}
    claims: list[dict[str, Any]] = field(default_factory=list)
    floors: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    notes: str = ""

    def units(self) -> list[Unit]:
        """Every unit, seed by seed, then cell by cell (the order they run in: a whole grid
        at one seed lands before the next seed starts)."""
        out = []
        for seed, cell in itertools.product(self.all_seeds(), self.cells):
            if seed not in (cell.get("seeds") or self.seeds):
                continue
            for label in cell["runs"]:
                run = self.runs[label]
                overrides = {**cell["set"], **run["set"], "seed": seed}
                overrides["strategy.name"] = run["strategy"]
                out.append(Unit(self.name, cell["name"], label, run["strategy"], seed, overrides,
                                run.get("untrained", False)))  # fmt: skip
        return out

    def all_seeds(self) -> list[int]:
        """The seeds any cell runs (a cell may run fewer than the study's)."""
        return sorted({s for c in self.cells for s in c.get("seeds") or self.seeds})

    def display(self, label: str) -> str:
        return self.runs[label].get("name", label)


def study_names() -> list[str]:
    return sorted(
        p.name[: -len(".toml")]
        for p in resources.files("fedlora.cli").joinpath("studies").iterdir()
        if p.name.endswith(".toml")
    )


def load_study(name: str, scale: str = "cpu") -> Study:
    """The study `name` at `scale`; a one-line error for an unknown name, scale or key."""
    if name not in study_names():
        raise FedLoraError(f"study {name!r}: choose one of {', '.join(study_names())}")
    if scale not in SCALES:
        raise FedLoraError(f"--scale {scale!r}: choose one of {', '.join(SCALES)}")
    path = resources.files("fedlora.cli").joinpath("studies", f"{name}.toml")
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    return _parse(name, scale, raw, f"studies/{name}.toml")


#: the keys each table of a study file may have (anything else is a typo, refused by name)
KEYS = {
    "": {"title", "preset", "seeds", "metric", "baseline", "set", "runs", "axis", "cell",
         "claim", "check", "floor", "scale", "notes", "grid_runs"},
    "runs": {"strategy", "name", "set", "untrained"},
    "axis": {"name", "key", "values"},
    "cell": {"name", "set", "runs", "seeds", "baseline"},
    "claim": {"text", "a", "b", "metric", "expect"},
    "check": {"text", "a", "b", "metric"},
    "floor": {"text", "run", "at_least", "than", "metric"},
    "scale": {"set", "seeds", "cells"},
}  # fmt: skip


def _check_keys(raw: dict[str, Any], where: str) -> None:
    """A one-line error naming the first key of `raw`'s tables that no study reads."""
    tables = [("", "", raw)]  # (kind, label, table)
    tables += [("runs", f"runs.{k}", v) for k, v in raw.get("runs", {}).items()]
    tables += [("scale", f"scale.{k}", v) for k, v in raw.get("scale", {}).items()]
    for kind in ("axis", "cell", "claim", "check", "floor"):
        for i, v in enumerate(raw.get(kind, [])):
            named = isinstance(v, dict) and "name" in v
            tables.append((kind, f"{kind} {v['name']!r}" if named else f"{kind}[{i}]", v))
    for kind, label, table in tables:
        if not isinstance(table, dict):
            raise FedLoraError(f"{where}: {label} must be a table")
        unknown = sorted(set(table) - KEYS[kind])
        if unknown:
            at = f"{label}: " if label else ""
            raise FedLoraError(f"{where}: {at}unknown key {unknown[0]!r}")


def _parse(name: str, scale: str, raw: dict[str, Any], where: str) -> Study:
    _check_keys(raw, where)
    scales = raw.get("scale", {})
    chain = {"toy": ["toy"], "cpu": [], "gpu": ["gpu"]}[scale]
    common = dict(raw.get("set", {}))
    seeds = list(raw.get("seeds", [0]))
    for s in chain:
        extra = scales.get(s, {})
        common |= extra.get("set", {})
        seeds = list(extra.get("seeds", seeds))
    runs = {}
    for label, run in raw.get("runs", {}).items():
        if "strategy" not in run:
            raise FedLoraError(f"{where}: runs.{label} has no strategy")
        runs[label] = {"strategy": run["strategy"], "set": dict(run.get("set", {})),
                       "untrained": bool(run.get("untrained", False)),
                       **({"name": run["name"]} if "name" in run else {})}  # fmt: skip
    cells = _cells(raw, runs, common, where)
    study = Study(
        name=name,
        title=raw.get("title", name),
        preset=raw["preset"],
        scale=scale,
        seeds=seeds,
        metric=raw.get("metric", "seen_clients/accuracy"),
        baseline=raw.get("baseline", next(iter(runs))),
        runs=runs,
        cells=cells,
        claims=list(raw.get("claim", [])),
        floors=list(raw.get("floor", [])),
        checks=list(raw.get("check", [])),
        notes=raw.get("notes", ""),
    )
    _check_refs(study, where)
    subset = scales.get(scale, {}).get("cells")
    if subset:  # a scale may run some of the cells (the toy check of the plumbing)
        study.cells = [c for c in cells if c["name"] in subset]
    return study


def _cells(raw, runs, common, where) -> list[dict[str, Any]]:
    cells = []
    axes = raw.get("axis", [])
    if axes:
        names = [[f"{a['name']}{v}" for v in a["values"]] for a in axes]
        values = [[(a["key"], v) for v in a["values"]] for a in axes]
        for parts, setting in zip(itertools.product(*names), itertools.product(*values)):
            cells.append({"name": "-".join(parts), "set": {**common, **dict(setting)},
                          "runs": list(raw.get("grid_runs", runs)),
                          "baseline": raw.get("baseline")})  # fmt: skip
    for c in raw.get("cell", []):
        cells.append({"name": c["name"], "set": {**common, **c.get("set", {})},
                      "runs": list(c.get("runs", runs)), "seeds": c.get("seeds"),
                      "baseline": c.get("baseline", raw.get("baseline"))})  # fmt: skip
    if not cells:
        raise FedLoraError(f"{where}: no cells (give [[axis]] or [[cell]] entries)")
    for c in cells:
        missing = [r for r in c["runs"] if r not in runs]
        if missing:
            raise FedLoraError(f"{where}: cell {c['name']} names run {missing[0]!r}, not in runs")
    return cells


def _check_refs(study: Study, where: str) -> None:
    pairs = [(c, "claim") for c in study.claims] + [(c, "check") for c in study.checks]
    refs = [(c.get(k), kind) for c, kind in pairs for k in ("a", "b")]
    refs += [(f.get(k), "floor") for f in study.floors for k in ("run", "than") if k in f]
    refs += [(c["baseline"], "baseline") for c in study.cells if "/" in str(c.get("baseline"))]
    for ref, kind in refs:
        cell, _, label = str(ref).partition("/")
        if not any(c["name"] == cell and label in c["runs"] for c in study.cells):
            raise FedLoraError(f"{where}: {kind} refers to {ref!r}, not a cell/run of the study")


# -- compact results -------------------------------------------------------------------------


def result_path(root: Path, unit: Unit) -> Path:
    """Where a unit's compact result lives: ``<root>/<study>/<cell>/<label>-seed<k>.json``."""
    return root / unit.study / unit.cell / f"{unit.label}-seed{unit.seed}.json"


def _round(x: Any) -> Any:
    if isinstance(x, float) and math.isfinite(x) and x != 0:
        return float(f"{x:.{_DIGITS}g}")
    return x


def compact_examples(row: dict[str, Any]) -> dict[str, Any]:
    """The per-example columns of one evaluation, rounded and with class names indexed (about
    4 bytes an example)."""
    out: dict[str, Any] = {"round": row["round"], "set": row["set"], "example": row["example"]}
    tasks = sorted(set(row["task"]))
    out["tasks"] = tasks
    out["task"] = [tasks.index(t) for t in row["task"]] if len(tasks) > 1 else None
    for key in ("nll", "rouge_l"):
        if key in row:
            out[key] = [_round(v) if v is not None else None for v in row[key]]
    if "ntok" in row:
        out["ntok"] = row["ntok"]
    if "label" in row:
        classes = sorted({str(v) for k in ("label", "pred") for v in row.get(k) or [] if v})
        out["classes"] = classes
        for key in ("label", "pred"):
            out[key] = [classes.index(str(v)) if v else None for v in row.get(key) or []]
    for key in row.keys() - out.keys() - {"tasks", "classes"}:
        out.setdefault(key, row[key])  # a column not known here is kept as it is
    return out


def expand_examples(c: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `compact_examples` (with the rounded values)."""
    row = dict(c)
    tasks = row.pop("tasks")
    idx = row.pop("task")
    row["task"] = [tasks[i] for i in idx] if idx is not None else [tasks[0]] * len(c["example"])
    classes = row.pop("classes", None)
    if classes is not None:
        for key in ("label", "pred"):
            row[key] = [classes[i] if i is not None else None for i in row.get(key) or []]
    return row


def as_run(result: dict[str, Any]) -> dict[str, Any]:
    """A compact result in the shape `fedlora.cli.comparison.compare` reads."""
    return {
        "dir": result["unit"],
        "name": result["label"],
        "summary": {**result["summary"], "strategy": result["strategy"]},
        "config": {"seed": result["seed"]},
        "examples": [expand_examples(e) for e in result["examples"]],
        "rows": [],
    }


def load_results(root: Path, study: Study) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(cell, label, seed) -> compact result, for the study's units that have one."""
    out = {}
    for unit in study.units():
        p = result_path(root, unit)
        if p.is_file():
            try:
                out[(unit.cell, unit.label, unit.seed)] = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise FedLoraError(f"{p}: not valid JSON ({e.msg}); delete it to rerun") from None
    return out


SUMMARY_KEYS = ("bytes_up", "bytes_down", "comm_ratio_vs_full_ft", "time_train", "time_eval",
                "time_total", "rounds")  # fmt: skip


def compact_result(run_dir: Path, unit: Unit, settings: dict[str, Any]) -> dict[str, Any]:
    """The committed record of a finished run: the unit, the `settings` the runner resolved
    (precision, device, hardware, versions, time), the summary's costs, the learning curve of
    every evaluated set and the last evaluation's per-example columns."""
    from fedlora.cli.report import load_run

    run = load_run(run_dir)
    summary = run["summary"] or {}
    curve = []
    for row in run["rows"]:
        if row.get("kind") == "eval":
            keep = {k: _round(v) for k, v in row.items()
                    if k in ("round", "set", "loss", "accuracy", "f1", "rouge_l")}  # fmt: skip
            curve.append(keep)
    train = [
        {"round": r["round"], "train_loss": _round(r.get("train_loss"))}
        for r in run["rows"]
        if r.get("kind") == "round"
    ]
    drops = sum(len(v) for v in (summary.get("dropped") or {}).values())
    return {
        "unit": unit.key,
        "study": unit.study,
        "cell": unit.cell,
        "label": unit.label,
        "strategy": unit.strategy,
        "seed": unit.seed,
        "overrides": unit.overrides,
        **settings,
        "summary": {k: _round(summary.get(k)) for k in SUMMARY_KEYS if k in summary}
        | {"dropped_updates": drops},
        "curve": curve,
        "train_loss": train,
        "examples": [compact_examples(r) for r in comparison.final_examples(run).values()],
    }
