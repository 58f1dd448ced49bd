"""scripts/fidelity.py: the studies cover what the fidelity report promises, and the document
sections and verdicts it writes are right (the studies themselves are long runs, not tests)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fid():
    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "scripts" / "fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fidelity"] = mod
    spec.loader.exec_module(mod)
    return mod


def _opts(cell):
    return {k: v for k, v in cell.overrides.items()}


def test_lora_a2_study_covers_the_grid(fid):
    study = fid.STUDIES["lora_a2"]("full")
    grid = {
        (float(c.overrides["data.dirichlet_alpha"]), int(c.overrides["resources.homogeneous_rank"]))
        for c in study.cells
    }
    assert grid == {(a, r) for a in (0.1, 0.01) for r in (8, 2, 1)}
    for cell in study.cells:
        assert cell.strategies == ["fedit", "ffa_lora", "flexlora", "lora_a2"]
        assert len(cell.seeds) >= 2 and cell.baseline == "fedit"
        assert json.loads(cell.overrides["data.tasks"]) == ["wn_lexname"]
    # one setting for every method: nothing in a cell depends on the strategy but its options
    assert len({json.dumps({**_opts(c), "data.dirichlet_alpha": 0, "resources.homogeneous_rank": 0},
                           sort_keys=True) for c in study.cells}) == 1  # fmt: skip


def test_flexlora_study_reuses_only_the_distribution_free_baseline(fid):
    study = fid.STUDIES["flexlora"]("full")
    assert [c.key for c in study.cells] == fid.FLEX_DISTS
    for cell in study.cells[1:]:
        assert cell.reuse == {"fedit": study.cells[0].key}
        assert {k: v for k, v in _opts(cell).items() if k != "resources.distribution"} == {
            k: v for k, v in _opts(study.cells[0]).items() if k != "resources.distribution"
        }
    assert all("hetlora" in c.strategies and c.baseline == "fedit" for c in study.cells)


def test_compare_command_and_run_layout(fid, tmp_path):
    cell = fid.Cell("c", "tiny", ["flexlora", "fedit"], "fedit", [0, 1], {"rounds": "2"})
    cmd = fid.compare_command(cell, tmp_path)
    assert cmd[cmd.index("--seeds") + 1] == "0,1" and "--resume" in cmd
    assert cmd[-2:] == ["--set", "rounds=2"]
    assert fid.run_dir(tmp_path, cell, "fedit", 1) == tmp_path / "c" / "seed1" / "fedit"
    one = fid.Cell("c", "tiny", ["fedit"], "fedit", [3], {})
    assert fid.run_dir(tmp_path, one, "fedit", 3) == tmp_path / "c" / "fedit"


def test_replace_section_keeps_the_prose_around_it(fid):
    text = "intro\n<!-- fidelity:x:begin -->\nold\n<!-- fidelity:x:end -->\nfindings\n"
    out = fid.replace_section(text, "x", "new table")
    assert out == "intro\n<!-- fidelity:x:begin -->\nnew table\n<!-- fidelity:x:end -->\nfindings\n"
    assert fid.replace_section(out, "x", "again").count("findings") == 1
    added = fid.replace_section("intro\n", "y", "body")
    assert added.endswith("<!-- fidelity:y:begin -->\nbody\n<!-- fidelity:y:end -->\n")


@pytest.mark.parametrize(
    ("diff", "p", "lower", "expected"),
    [
        (0.02, 0.01, False, "holds"),
        (-0.02, 0.01, True, "holds"),
        (-0.02, 0.01, False, "reversed"),
        (0.02, 0.2, False, "not significant"),
        (0.0, 0.0, False, "not significant"),
    ],
)
def test_verdict(fid, diff, p, lower, expected):
    assert fid.verdict({"diff": diff, "p_value": p}, lower) == expected


def test_fmt_diff_and_ci(fid):
    m = {"mean": 0.5, "ci95": [0.4, 0.6], "diff": 0.031, "p_value": 0.0004}
    assert fid.fmt_ci(m, 100) == "50.0 [40.0, 60.0]"
    assert fid.fmt_diff(m, 100) == "+3.1 (p<0.001)*"
    assert fid.fmt_diff({**m, "p_value": 0.2}, 100) == "+3.1 (p=0.200)"
    assert fid.fmt_ci(None) == "–" and fid.fmt_diff({"diff": None}) == "–"
