"""`fedlora reproduce`: studies as data, one runner, pages rebuilt from compact results alone."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from fedlora.cli import main
from fedlora.cli.reproduce import check_run_dir
from fedlora.cli.study import (
    SCALES,
    as_run,
    compact_examples,
    expand_examples,
    load_results,
    load_study,
    study_names,
)
from fedlora.cli.study_page import compare_pair, verdict
from fedlora.core.contract import FedLoraError
from fedlora.federation.config import dumps_toml, load_config


def test_every_study_parses_at_every_scale():
    assert {"lora_a2", "flexlora", "flora", "lora_a2_probes"} <= set(study_names())
    for name in study_names():
        for scale in SCALES:
            study = load_study(name, scale)
            keys = [u.key for u in study.units()]
            assert len(keys) == len(set(keys)), name
            for u in study.units():  # every unit is a valid configuration
                load_config(study.preset, u.overrides)


def test_lora_a2_grid_is_the_issue_floor():
    study = load_study("lora_a2")
    grid = [u for u in study.units() if re.fullmatch(r"dir[0-9.]+-r[0-9]+", u.cell)]
    assert len(grid) == 48  # 2 Dirichlet x 3 ranks x 4 methods x 2 seeds
    assert {u.strategy for u in grid} == {"fedit", "ffa_lora", "flexlora", "lora_a2"}
    assert [u.seed for u in grid[:24]] == [0] * 24  # a whole grid at seed 0 lands first


def test_flexlora_distribution_cells_run_against_the_baselines_cell():
    study = load_study("flexlora")
    units = study.units()
    grid = [u for u in units if "-" not in u.cell]  # the diagnostic cells are named a-b
    assert len(grid) == 2 * (3 + 4 * 2)  # seeds x (baselines + 4 distributions x 2 methods)
    cells = {u.cell: set() for u in units}
    for u in units:
        cells[u.cell].add(u.label)
    assert cells["baselines"] == {"untrained", "fedit_min", "fedit_med"}
    assert cells["heavy_tail_strong"] == {"flexlora", "hetlora"}
    # a diagnostic's FedIT keeps its run's homogeneous smallest rank over the cell's distribution
    for u in units:
        if u.label == "fedit_min":
            assert u.overrides["resources.distribution"] == "homogeneous", u.cell
    assert [u for u in units if u.untrained] and all(
        u.overrides["resources.homogeneous_type"] == 1 for u in units if u.untrained
    )


def test_unknown_study_scale_and_cell_are_one_line_errors(capsys):
    assert main(["reproduce", "nope"]) == 2
    assert "study 'nope': choose one of" in capsys.readouterr().err
    assert main(["reproduce", "lora_a2", "--cells", "dir9-*", "--tables-only"]) == 2
    assert "--cells 'dir9-*': no such cell in lora_a2" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        ("cell", 'run_set = { fedit = { "train.lr" = 1.0 } }'),  # a per-run setting misplaced
        ("runs.fedit", 'sett = { "train.lr" = 1.0 }'),
        ("claim", 'expected = "worse"'),
        ("check", 'expect = "worse"'),  # a check has no verdict, so no direction
        ("floor", "at_most = 0.5"),
        ("scale.toy", 'cell = ["dir0.01-r1"]'),
    ],
)
def test_a_misspelt_key_anywhere_in_a_study_is_refused_by_name(where, fragment):
    """Every table of a study file is checked: a key no study reads would otherwise be
    dropped without a word, and the unit would run without the setting it was meant to have."""
    from importlib import resources

    import tomllib

    from fedlora.cli.study import _parse

    text = resources.files("fedlora.cli").joinpath("studies", "lora_a2.toml").read_text()
    raw = tomllib.loads(text)
    _parse("lora_a2", "cpu", raw, "studies/lora_a2.toml")  # the shipped file is clean
    table = {"cell": raw["cell"][0], "runs.fedit": raw["runs"]["fedit"],
             "claim": raw["claim"][0], "check": raw["check"][0], "floor": raw["floor"][0],
             "scale.toy": raw["scale"]["toy"]}[where]  # fmt: skip
    key, value = next(iter(tomllib.loads(fragment).items()))
    table[key] = value
    with pytest.raises(FedLoraError, match=rf"studies/lora_a2.toml: .*unknown key '{key}'"):
        _parse("lora_a2", "cpu", raw, "studies/lora_a2.toml")


def _row(rng, n, classes=("a", "b", "c")):
    return {
        "round": 3,
        "set": "seen_clients",
        "example": sorted(rng.choice(10_000, n, replace=False).tolist()),
        "task": ["t1"] * n,
        "nll": rng.exponential(2.0, n).tolist(),
        "ntok": [1] * n,
        "label": rng.choice(classes, n).tolist(),
        "pred": rng.choice(classes, n).tolist(),
    }


def test_compact_examples_round_trip():
    rng = np.random.default_rng(0)
    row = _row(rng, 50)
    back = expand_examples(json.loads(json.dumps(compact_examples(row))))
    assert back["label"] == row["label"] and back["pred"] == row["pred"]
    assert back["example"] == row["example"] and back["task"] == row["task"]
    np.testing.assert_allclose(back["nll"], row["nll"], rtol=1e-5)


def _result(cell, label, seed, row):
    return {"unit": f"{cell}/{label}-seed{seed}", "label": label, "strategy": label, "seed": seed,
            "summary": {}, "examples": [compact_examples(row)]}  # fmt: skip


def test_claim_across_cells_against_a_numpy_reference():
    """compare_pair of two runs in different cells: the accuracy difference is the mean of the
    per-seed differences, and the paired permutation p-value agrees with a numpy one."""
    study = load_study("lora_a2")
    rng = np.random.default_rng(3)
    results, diffs = {}, []
    for seed in (0, 1):
        a, b = _row(rng, 60), _row(rng, 60)
        b["example"] = a["example"]
        a["pred"] = [lab if rng.random() < 0.7 else p for lab, p in zip(a["label"], a["pred"])]
        results[("dir0.01-r1", "lora_a2", seed)] = _result("dir0.01-r1", "lora_a2", seed, a)
        results[("dir0.01-r8", "fedit", seed)] = _result("dir0.01-r8", "fedit", seed, b)
        ca = np.array([x == y for x, y in zip(a["label"], a["pred"])], float)
        cb = np.array([x == y for x, y in zip(b["label"], b["pred"])], float)
        diffs.append((ca, cb))
    res = compare_pair(study, results, "dir0.01-r1/lora_a2", "dir0.01-r8/fedit")
    m = res["strategies"]["dir0.01-r1/lora_a2"]["metrics"]["seen_clients/accuracy"]
    want = np.mean([ca.mean() - cb.mean() for ca, cb in diffs])
    assert m["diff"] == pytest.approx(want, abs=1e-12)
    # reference permutation test: swap each example's pair with probability 1/2
    perm = np.random.default_rng(0)
    hits = 0
    for _ in range(4000):
        d = []
        for ca, cb in diffs:
            s = perm.random(len(ca)) < 0.5
            d.append(np.where(s, cb, ca).mean() - np.where(s, ca, cb).mean())
        hits += abs(np.mean(d)) >= abs(want) - 1e-12
    assert m["p_value"] == pytest.approx(hits / 4000, abs=0.03)
    assert verdict("seen_clients/accuracy", m["diff"], m["p_value"]) == (
        "holds" if m["p_value"] < 0.05 else "not significant"
    )


def test_a_check_is_tabulated_with_its_ci_and_p_and_no_verdict():
    """A ``[[check]]`` (a diagnostic comparison) shows a - b, its CI and p as a claim does,
    from the same `compare_pair`, and never a verdict; one whose run has not landed is
    pending; one naming no run of the study is refused by name."""
    from fedlora.cli.study import _check_refs
    from fedlora.cli.study_page import render_study

    study = load_study("lora_a2")
    study.claims = []
    study.checks = [
        {"text": "combined vs LoRA-A2", "a": "dir0.1-r1/fedit", "b": "dir0.1-r1/lora_a2"},
        {"text": "not landed", "a": "dir0.1-r8/fedit", "b": "dir0.1-r1/lora_a2"},
    ]
    rng = np.random.default_rng()
    results = {}
    for seed in (0, 1):
        a, b = _row(rng, 80), _row(rng, 80)
        b["example"] = a["example"]
        results[("dir0.1-r1", "fedit", seed)] = _result("dir0.1-r1", "fedit", seed, a)
        results[("dir0.1-r1", "lora_a2", seed)] = _result("dir0.1-r1", "lora_a2", seed, b)
    for r in results.values():  # what the cost table reads
        r |= {"summary": {"time_total": 60.0}, "precision": "fp32", "device": "cpu",
              "hardware": {"cpu": "x"}}  # fmt: skip
    m = compare_pair(study, results, "dir0.1-r1/fedit", "dir0.1-r1/lora_a2")
    m = m["strategies"]["dir0.1-r1/fedit"]["metrics"]["seen_clients/accuracy"]
    page = render_study(study, results)
    table = page[page.index("**Checks**"):].split("\n\n")[1]
    rows = table.splitlines()[2:]
    diff = f"{m['diff'] * 100:+.1f} [{m['diff_ci95'][0] * 100:+.1f}, "
    assert rows[0].startswith("| combined vs LoRA-A2 | `dir0.1-r1/fedit` |") and diff in rows[0]
    assert rows[0].endswith("p<0.001 |" if m["p_value"] < 0.001 else f"p={m['p_value']:.3f} |")
    assert rows[1].endswith("| – | – |")
    assert len(rows) == 2 and not re.search("holds|reversed|significant|pending", table)
    study.checks.append({"text": "typo", "a": "dir9-r1/fedit", "b": "dir0.1-r1/fedit"})
    with pytest.raises(FedLoraError, match="check refers to 'dir9-r1/fedit'"):
        _check_refs(study, "studies/lora_a2.toml")


def test_verdicts():
    assert verdict("x/accuracy", 0.1, 0.01) == "holds"
    assert verdict("x/accuracy", -0.1, 0.01) == "reversed"
    assert verdict("x/accuracy", 0.1, 0.2) == "not significant"
    assert verdict("x/loss", -0.1, 0.01) == "holds"  # a lower loss is better
    assert verdict("x/loss", 0.1, 0.01, expect="worse") == "holds"
    assert verdict("x/accuracy", None, None) == "pending"


def test_a_changed_study_refuses_an_old_run_dir(tmp_path):
    study = load_study("lora_a2", "toy")
    unit = study.units()[0]
    cfg = load_config(study.preset, {**unit.overrides, "train.lr": 0.123})
    (tmp_path / "config.toml").write_text(dumps_toml(cfg))
    with pytest.raises(FedLoraError, match="train.lr = 0.123.*move that folder away"):
        check_run_dir(study, unit, tmp_path)
    same = load_config(study.preset, {**unit.overrides, "threads": 2, "output_dir": "x"})
    (tmp_path / "config.toml").write_text(dumps_toml(same))
    check_run_dir(study, unit, tmp_path)  # threads and output_dir do not change a run


def test_toy_study_runs_resumes_and_rebuilds_from_results_alone(tmp_path, capsys):
    args = ["reproduce", "lora_a2", "--scale", "toy", "--jobs", "2",
            "--results", str(tmp_path / "results"), "--doc", str(tmp_path / "page.md"),
            "--runs", str(tmp_path / "runs")]  # fmt: skip
    (tmp_path / "page.md").write_text("# my page\n\nhand-written prose stays.\n")
    assert main(args) == 0
    study = load_study("lora_a2", "toy")
    results = load_results(tmp_path / "results", study)
    assert len(results) == len(study.units()) == 4
    for r in results.values():
        assert r["precision"] == "fp32" and r["device"] == "cpu"
        assert {"cpu", "bf16_native"} <= set(r["hardware"]) and r["time"]["wall_s"] > 0
        assert r["time"]["resumed"] is False and r["summary"]["time_total"] > 0
        assert r["overrides"]["model.name"] == "tiny-bert" and r["curve"]
        assert len(json.dumps(r)) < 20_000  # compact: a few KB
        assert as_run(r)["examples"][0]["example"]
    page = (tmp_path / "page.md").read_text()
    assert page.startswith("# my page\n\nhand-written prose stays.\n")
    assert "<!-- reproduce:lora_a2:begin -->" in page and "4 of 4 runs finished" in page
    # the run directories are not needed any more: tables come from the results alone
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "page.md").write_text(page.replace("4 of 4 runs", "stale text"))
    assert main([*args, "--tables-only"]) == 0
    assert (tmp_path / "page.md").read_text() == page
    capsys.readouterr()
    assert main(args) == 0  # nothing left to run
    assert "4 of 4 units finished, 0 to run" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_costs_count_a_resumed_runs_rounds_not_its_last_process():
    """A run resumed after an interruption lands with the wall time of its last part only;
    the cost table takes the run's own round times, which span every part."""
    from fedlora.cli.study_page import _costs

    study = load_study("lora_a2", "cpu")
    cell = study.cells[0]["name"]
    hw = {"cpu": "some CPU"}
    results = {
        (cell, "fedit", 0): {"summary": {"time_total": 300.0}, "time": {"wall_s": 30.0},
                             "precision": "fp32", "device": "cpu", "hardware": hw},
        (cell, "fedit", 1): {"summary": {"time_total": 420.0}, "time": {"wall_s": 400.0},
                             "precision": "fp32", "device": "cpu", "hardware": hw},
    }  # fmt: skip
    row = next(line for line in _costs(study, results).splitlines() if line.startswith(f"| {cell}"))
    assert row == f"| {cell} | 2 | 12.0 | 6.0 (5.0-7.0) | fp32 | cpu | some CPU |"


def test_costs_leave_out_an_untrained_reference():
    """FLoRA's homogeneous cell holds an untrained reference (one evaluation, seconds): the
    cost of a run is that of the training runs alone."""
    from fedlora.cli.study_page import _costs

    study = load_study("flora", "cpu")
    hw = {"cpu": "some CPU"}
    row = {"precision": "bf16", "device": "cpu", "hardware": hw}
    results = {
        ("homogeneous", "untrained", 0): {**row, "summary": {"time_total": 24.0}},
        ("homogeneous", "fedit", 0): {**row, "summary": {"time_total": 600.0}},
        ("homogeneous", "flora", 0): {**row, "summary": {"time_total": 900.0}},
    }
    line = next(s for s in _costs(study, results).splitlines() if s.startswith("| homogeneous"))
    assert line == "| homogeneous | 2 | 25.0 | 12.5 (10.0-15.0) | bf16 | cpu | some CPU |"


def test_a_run_keeps_its_colour_in_every_panel(tmp_path, monkeypatch):
    """Cells run different subsets of the runs (LoRA-A2's rsLoRA cells: FL+LoRA and LoRA-A2
    only): a run's line has one colour in every panel, the one the legend gives it."""
    from pathlib import Path

    import fedlora.cli.report as report
    from fedlora.cli.study_page import plot_curves

    root = Path(__file__).resolve().parents[1]
    study = load_study("lora_a2", "cpu")
    results = load_results(root / "results/fidelity", study)
    if not any("rslora" in c for c, _, _ in results):
        pytest.skip("no committed result of a cell with a subset of the runs")
    figs = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figs.append(fig) or path)
    plot_curves(study, results, tmp_path / "curves.png")
    colour: dict[str, set] = {}
    for ax in figs[0].axes:
        for line in ax.get_lines():
            colour.setdefault(line.get_label(), set()).add(line.get_color())
    assert len(colour) >= 2 and all(len(c) == 1 for c in colour.values()), colour
    legend = figs[0].axes[0].get_legend()
    for text, handle in zip(legend.get_texts(), legend.legend_handles):
        assert {handle.get_color()} == colour[text.get_text()]


def test_committed_page_is_rebuilt_unchanged_from_committed_results(tmp_path):
    """docs/fidelity.md is what `fedlora reproduce STUDY --tables-only` makes of results/."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "fidelity.md").read_text()
    (tmp_path / "fidelity.md").write_text(page)
    for name in ("lora_a2_probes", "lora_a2", "flexlora", "flora"):
        args = ["reproduce", name, "--tables-only", "--results", str(root / "results/fidelity"),
                "--doc", str(tmp_path / "fidelity.md")]  # fmt: skip
        assert main(args) == 0
    assert (tmp_path / "fidelity.md").read_text() == page


def test_two_runners_never_run_one_unit(tmp_path):
    """A unit claimed by a live process is skipped; a claim left by a dead one is taken."""
    import os
    import subprocess
    import sys

    from fedlora.cli.reproduce import claim, release

    where = tmp_path / "cell" / "fedit-seed0"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "cell").mkdir()
        (tmp_path / "cell" / "fedit-seed0.claim").write_text(str(other.pid))
        assert not claim(where)  # the other runner holds it
    finally:
        other.kill()
        other.wait()
    assert claim(where)  # its process is gone: taken over
    assert (tmp_path / "cell" / "fedit-seed0.claim").read_text() == str(os.getpid())
    release(where)
    assert not (tmp_path / "cell" / "fedit-seed0.claim").exists()


def test_untrained_reference_is_the_model_before_training(tmp_path):
    """`fedlora.cli.untrained` evaluates the examples a trained run of the same configuration
    evaluates, on the base model: a run that trains at lr 1e-12 gives the same per-example
    losses (to rounding), one at lr 1e-2 does not."""
    from fedlora.cli.report import load_run
    from fedlora.cli.untrained import evaluate_untrained
    from fedlora.engine import run_experiment

    over = {"rounds": 1, "train.local_steps": 2, "threads": 1, "eval.metrics": ["loss"]}
    evaluate_untrained("tiny", over, tmp_path / "untrained")
    base = load_run(tmp_path / "untrained")["examples"]
    for lr, same in ((1e-12, True), (1e-2, False)):
        cfg = load_config("tiny", {**over, "train.lr": lr, "output_dir": str(tmp_path / str(lr))})
        run_experiment(cfg, progress=False)
        trained = load_run(tmp_path / str(lr))["examples"]
        assert [r["set"] for r in trained] == [r["set"] for r in base]
        for a, b in zip(base, trained):
            assert a["example"] == b["example"] and a["round"] == 0
            close = np.allclose(a["nll"], b["nll"], rtol=1e-6, atol=1e-6)
            assert close == same, (lr, a["set"])
