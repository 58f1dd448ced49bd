"""Issue 27: careless hands. A full disk at any write is one line (plots are optional: a
warning), an overflowing privacy value is one line, and the quiet cases say so (ranks above a
module's size, rows of empty strings)."""

from __future__ import annotations

import errno
import json
import logging

import pytest
from test_run_dirs import _one_error, _run

import fedlora.federation.checkpoint as ckpt
from fedlora.cli import commands as cli
from fedlora.cli import report
from fedlora.data.examples import load_examples
from fedlora.federation import rundir
from fedlora.federation.config import load_preset


def _full(path="") -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", *([str(path)] if path else []))


def test_a_full_disk_while_plotting_is_a_warning(tmp_path, monkeypatch, capsys, caplog):
    """Before: exit 1 and two tracebacks from cli/report.py."""

    def full(fig, path):
        raise _full(path)

    monkeypatch.setattr(report, "save_figure", full)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert cli.main(_run(out)) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert any("plots not written" in r.getMessage() for r in caplog.records)
    assert ckpt.load_checkpoint(out)["round"] == 1 and (out / "metrics.jsonl").is_file()


def test_a_full_disk_mid_run_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    """metrics.jsonl cannot be appended to in round 2: one line naming it, exit 2; round 1's
    checkpoint is intact and the run resumes."""
    real, calls = open, []

    def fake_open(path, mode="r", *a, **k):
        if mode == "a":
            calls.append(path)
            if len(calls) > 2:  # round 1's rows went through
                raise _full()
        return real(path, mode, *a, **k)

    monkeypatch.setattr(rundir, "open", fake_open, raising=False)
    out = tmp_path / "run"
    assert cli.main(_run(out, "--rounds", "2", "--eval.every", "100")) == 2
    _one_error(capsys, f"{out}/", ".jsonl: cannot write: No space left on device", "--resume")
    monkeypatch.undo()
    assert ckpt.load_checkpoint(out)["round"] == 1
    assert cli.main(["run", "--resume", str(out), "-q", "--rounds", "2"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["kind"] == "round"] == [1, 2]


def test_an_overflowing_noise_multiplier_is_one_line(tmp_path, capsys):
    """Before: OverflowError from Opacus via core/accounting.py."""
    argv = _run(tmp_path / "dp", "--privacy.mode", "central", "--privacy.noise_multiplier", "1e308")
    assert cli.main(argv) == 2
    _one_error(capsys, "privacy.noise_multiplier = 1e+308", "at most 10000")


def test_ranks_above_a_modules_size_are_capped_with_a_warning(caplog):
    from fedlora.federation.build import client_specs

    over = {"resources.distribution": "homogeneous", "resources.homogeneous_rank": 64}
    cfg = load_preset("tiny", over)
    shapes = {"q": (32, 32), "k": (16, 32)}
    with caplog.at_level(logging.WARNING):
        specs = client_specs(cfg, list(shapes), shapes, [[0]] * cfg.data.num_clients)
    assert specs[0].ranks == {"q": 32, "k": 16}
    (line,) = [r.getMessage() for r in caplog.records if "capped" in r.getMessage()]
    assert "rank 64 is above module q's min(d_out, d_in) = 32 (and 1 more modules)" in line


def test_rows_of_empty_strings_are_said(caplog):
    rows = [{"instruction": "", "input": "", "output": ""}] * 200
    with caplog.at_level(logging.WARNING):
        got = load_examples(rows)
    assert len(got) == 200
    assert any("200 of 200 rows have empty" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", ["1e5", "inf"])
def test_other_noise_multipliers_out_of_range(value):
    from fedlora.federation.config import ConfigError

    with pytest.raises(ConfigError, match="privacy.noise_multiplier"):
        load_preset("tiny", {"privacy.mode": "central", "privacy.noise_multiplier": value})
