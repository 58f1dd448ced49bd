"""`fedlora compare --seeds` and `fedlora report`: compare.json with CIs and paired p-values,
checked against the runs' own metrics rows; rebuilt from run directories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlora.cli.commands import main

BASE = "fedit (homogeneous, type-1 rank)"


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    argv = ["compare", "--preset", "tiny", "--strategies", "flexlora,fedit", "--seeds", "0,1"]
    rc = main([*argv, "--rounds", "2", "--output-dir", str(out), "-q"])
    assert rc == 0
    return out


def _final_eval(run_dir, eval_set):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval" and r["set"] == eval_set][-1]


def test_compare_json_has_means_cis_and_p_values(compared):
    res = json.loads((compared / "compare.json").read_text())
    assert res["baseline"] == BASE and res["seeds"] == [0, 1]
    assert list(res["strategies"]) == ["flexlora", BASE]
    for label, entry in res["strategies"].items():
        assert entry["seeds"] == [0, 1]
        metrics = entry["metrics"]
        for key in ("seen_clients/loss", "seen_clients/accuracy", "unseen_tasks/loss"):
            m = metrics[key]
            lo, hi = m["ci95"]
            assert lo <= m["mean"] <= hi
            assert len(m["per_seed"]) == 2 and m["mean"] == pytest.approx(np.mean(m["per_seed"]))
            if label == BASE:
                assert m["p_value"] is None
            else:
                assert 0 < m["p_value"] <= 1
                dlo, dhi = m["diff_ci95"]
                assert dlo <= m["diff"] <= dhi
        assert any(k.count("/") == 2 for k in metrics), "per-task metrics are compared too"


def test_compare_values_match_the_runs_metrics(compared):
    res = json.loads((compared / "compare.json").read_text())
    for key in ("loss", "accuracy"):
        a = [_final_eval(compared / f"seed{s}" / "flexlora", "seen_clients") for s in (0, 1)]
        b = [_final_eval(compared / f"seed{s}" / "fedit", "seen_clients") for s in (0, 1)]
        m = res["strategies"]["flexlora"]["metrics"][f"seen_clients/{key}"]
        assert m["per_seed"] == pytest.approx([r[key] for r in a], rel=1e-9)
        assert m["diff"] == pytest.approx(np.mean([x[key] - y[key] for x, y in zip(a, b)]))
        # the run's own rows carry a CI per metric and per task
        assert all(f"{key}_ci95" in r for r in a)
    assert any(k.endswith("/loss_ci95") for k in a[0])


def test_compare_txt_and_plot(compared):
    text = (compared / "compare.txt").read_text()
    assert "95% CI" in text and "p=" in text and BASE in text
    assert (compared / "compare.png").stat().st_size > 0


def test_report_rebuilds_the_comparison(compared, tmp_path):
    want = json.loads((compared / "compare.json").read_text())
    (compared / "compare.json").unlink()
    assert main(["report", str(compared), "-q"]) == 0
    got = json.loads((compared / "compare.json").read_text())
    assert got["baseline"] == want["baseline"]
    for label in want["strategies"]:
        assert got["strategies"][label]["metrics"] == want["strategies"][label]["metrics"]


def test_report_refuses_runs_evaluated_on_different_examples(compared, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(compared, copy)
    path = copy / "seed1" / "fedit" / "eval_examples.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        r["example"] = [i + 1 for i in r["example"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(copy), "-q"]) == 2
    assert "different examples" in capsys.readouterr().err


def test_compare_rejects_bad_seeds_and_baseline(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["compare", "--preset", "tiny", "--seeds", "0,0", "--output-dir", out]) == 2
    assert "--seeds" in capsys.readouterr().err
    argv = ["compare", "--preset", "tiny", "--strategies", "flexlora", "--baseline", "flora"]
    assert main([*argv, "--output-dir", out]) == 2
    assert "--baseline" in capsys.readouterr().err
