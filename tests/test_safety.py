"""Safe runs: no silent overwrite, checkpoints that cannot run code, a message (exit 2, no
traceback) for every bad input, bounded ranks, temporary-file cleanup, one permission policy."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

import fedlora.federation.checkpoint as ckpt
from fedlora.cli import commands as cli
from fedlora.core.contract import FedLoraError
from fedlora.engine import run_experiment
from fedlora.federation.build import client_specs
from fedlora.federation.config import load_preset

FAST = [
    "--rounds", "1", "--clients_per_round", "2", "--data.num_clients", "4",
    "--train.local_steps", "1", "--train.max_length", "32", "--eval.max_examples", "2",
    "--eval.metrics", '["loss"]', "--eval.per_task", "false",
]  # fmt: skip


def _fast_cfg(out, **extra):
    return load_preset(
        "tiny",
        {
            "output_dir": str(out),
            "rounds": 1,
            "clients_per_round": 2,
            "data.num_clients": 4,
            "train.local_steps": 1,
            "train.max_length": 32,
            "eval.max_examples": 2,
            "eval.metrics": ["loss"],
            "eval.per_task": False,
            **extra,
        },
    )


def _digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["run", "--preset", "tiny", "-q", "--output-dir", str(out), *FAST]) == 0
    return out


def test_rerun_into_a_finished_run_is_refused_and_leaves_it_untouched(
    finished_run, tmp_path, capsys
):
    before = _digest(finished_run)
    argv = ["run", "--preset", "tiny", "-q", "--output-dir", str(finished_run), *FAST]
    assert cli.main([*argv, "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert _digest(finished_run) == before
    # --overwrite replaces it (a copy, the fixture is shared)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "notes.txt").write_text("mine")
    argv = ["run", "--preset", "tiny", "-q", "--output-dir", str(copy), *FAST]
    assert cli.main([*argv, "--seed", "5", "--overwrite"]) == 0
    assert (copy / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    assert _digest(copy)["metrics.jsonl"] != before["metrics.jsonl"]


def test_a_pickle_in_the_checkpoint_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    run = tmp_path / "run"
    assert cli.main(["run", "--preset", "tiny", "-q", "--output-dir", str(run), *FAST]) == 0
    assert pickle.loads(pickle.dumps(Payload())) is None and marker.exists()  # it is live
    marker.unlink()
    # an old-style checkpoint.pt (a torch.save pickle) holding the payload
    (run / ckpt.CHECKPOINT).unlink()
    torch.save({"format": 1, "x": Payload()}, run / ckpt.LEGACY_CHECKPOINT)
    assert cli.main(["run", "--resume", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert "written by an older fedlora" in err and "Traceback" not in err
    assert not marker.exists()
    # the same bytes under the new name: not a safetensors file
    os.replace(run / ckpt.LEGACY_CHECKPOINT, run / ckpt.CHECKPOINT)
    assert cli.main(["run", "--resume", str(run), "-q"]) == 2
    assert "not a readable fedlora checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.fixture
def bad_inputs(tmp_path, finished_run):
    """Each bad input of issue 11 (item 5) as (argv, words the message must hold)."""
    import shutil

    t = tmp_path
    run = ["run", "--preset", "tiny", "-q", *FAST]

    def data(name, content):
        out = str(t / f"out-{name}")
        return [*run, "--output-dir", out, "--data.source", _write(t / name, content)]

    def broken_copy(name, mutate):
        d = t / name
        shutil.copytree(finished_run, d)
        mutate(d)
        return d

    ck = ckpt.CHECKPOINT
    truncated = broken_copy(
        "truncated", lambda d: (d / ck).write_bytes((d / ck).read_bytes()[:200])
    )
    garbage = broken_copy("garbage", lambda d: (d / ck).write_bytes(os.urandom(4096)))
    torn = broken_copy(
        "torn",
        lambda d: (d / "metrics.jsonl").write_bytes(
            (d / "metrics.jsonl").read_bytes() + b'{"kind": "round", "rou'
        ),
    )
    return {
        "empty file": (data("empty.jsonl", b""), ["empty.jsonl", "no examples"]),
        "no output column": (
            data("cols.jsonl", b'{"instruction": "a", "input": "b"}\n'),
            ["cols.jsonl", "'output' or 'label'"],
        ),
        "not UTF-8": (data("latin.jsonl", b'{"instruction": "\xe9t\xe9"}\n'), ["UTF-8"]),
        "not JSON": (data("bad.json", b'{"instruction": "a", "output": \n'), ["invalid JSON"]),
        "missing model": (
            [*run, "--output-dir", str(t / "m"), "--model.name", str(t / "no-such-model")],
            ["model.name", "no such directory"],
        ),
        "bad strategy option": (
            [*run, "--output-dir", str(t / "s"), "--set", "strategy.options.split=foo"],
            ["split", "foo"],
        ),
        "too many clients": (
            [*run, "--output-dir", str(t / "n"), "--data.num_clients", "100000"],
            ["num_clients=100000"],
        ),
        "truncated checkpoint": (
            ["run", "--resume", str(truncated), "-q"],
            [str(truncated / ck), "not a readable"],
        ),
        "garbage checkpoint": (
            ["run", "--resume", str(garbage), "-q"],
            [str(garbage / ck), "not a readable"],
        ),
        "torn metrics line": (["report", str(torn)], ["metrics.jsonl, line", "not valid JSON"]),
    }


CASES = [
    "empty file",
    "no output column",
    "not UTF-8",
    "not JSON",
    "missing model",
    "bad strategy option",
    "too many clients",
    "truncated checkpoint",
    "garbage checkpoint",
    "torn metrics line",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_message_not_a_traceback(case, bad_inputs, capsys):
    argv, words = bad_inputs[case]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fedlora: error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_internal_errors_keep_their_traceback(monkeypatch):
    def bug(args):
        return [][1]  # an IndexError inside fedlora: not bad input

    monkeypatch.setattr(cli, "cmd_presets", bug)
    with pytest.raises(IndexError):
        cli.main(["presets"])

    def library_value_error(args):
        import json

        json.loads("{")  # a ValueError raised inside a library, not by fedlora's checks

    monkeypatch.setattr(cli, "cmd_presets", library_value_error)
    with pytest.raises(ValueError):
        cli.main(["presets"])


def test_homogeneous_rank_is_capped_like_the_other_ranks():
    cfg = load_preset(
        "tiny", {"resources.distribution": "homogeneous", "resources.homogeneous_rank": 100000}
    )
    shapes = {"q": (64, 48), "up": (128, 64)}
    specs = client_specs(cfg, list(shapes), shapes, [[0]] * cfg.data.num_clients)
    assert all(s.ranks == {"q": 48, "up": 64} for s in specs)


def test_stale_temp_files_are_removed_and_files_follow_the_umask(tmp_path):
    cfg = _fast_cfg(tmp_path / "run")
    run_experiment(cfg, progress=False)
    stale = tmp_path / "run" / f".{ckpt.CHECKPOINT}.abc123.tmp"
    stale.write_bytes(b"partial")
    run_experiment(_fast_cfg(tmp_path / "run", rounds=2), resume=True, progress=False)
    assert not stale.exists()
    assert not list((tmp_path / "run").glob(".*.tmp"))
    want = 0o666 & ~ckpt._umask()
    for name in (ckpt.CHECKPOINT, "metrics.jsonl", "summary.json", "config.toml"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == want, name


def test_checkpoint_refuses_unknown_objects(tmp_path):
    class Opaque:
        pass

    with pytest.raises(TypeError, match=r"state\.strategy\.thing is a Opaque"):
        ckpt.save_checkpoint(tmp_path, {"strategy": {"thing": Opaque()}})
    assert ckpt.load_checkpoint(tmp_path) is None


def test_checkpoint_roundtrips_nested_state(tmp_path):
    import numpy as np

    from fedlora.core.contract import LoraFactors
    from fedlora.core.linalg import LowRankSum

    acc = LowRankSum((5, 4))
    acc.add(torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    state = {
        "round": 2,
        "strategy": {
            "heads": {"classifier": {"weight": torch.randn(3, 4), "bias": torch.zeros(3)}},
            "sums": {"m": acc},
            "total": {"m": LoraFactors(torch.zeros(0, 4), torch.zeros(5, 0), 1.0)},
            "svd": {"m": (torch.ones(2), torch.eye(2))},
            "by_int": {3: [1, 2.5, None, "x"]},
            "mask": np.arange(4, dtype=np.int32),
        },
    }
    ckpt.save_checkpoint(tmp_path, state)
    got = ckpt.load_checkpoint(tmp_path)["strategy"]
    assert torch.equal(
        got["heads"]["classifier"]["weight"], state["strategy"]["heads"]["classifier"]["weight"]
    )
    assert torch.equal(got["sums"]["m"].dense(), acc.dense())
    assert got["total"]["m"].A.shape == (0, 4) and isinstance(got["svd"]["m"], tuple)
    assert got["by_int"] == {3: [1, 2.5, None, "x"]}
    assert got["mask"].dtype == np.int32 and got["mask"].tolist() == [0, 1, 2, 3]


def test_partition_plot_aggregates_many_clients(tmp_path):
    from fedlora.cli import report

    hist = [{"a": i % 7 + 1, "b": 2} for i in range(5000)]
    part = {"key": "task", "sizes": [sum(h.values()) for h in hist], "histograms": hist}
    run = {"dir": tmp_path, "rows": [], "partition": part, "spectrum": None}
    paths = report.plot_run(run)
    assert (tmp_path / "plots" / "partition.png") in paths


def test_fedlora_error_is_raised_by_resume_of_an_old_checkpoint(tmp_path):
    torch.save({"format": 1}, tmp_path / ckpt.LEGACY_CHECKPOINT)
    with pytest.raises(FedLoraError, match="older fedlora"):
        ckpt.load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("robust.max_norm_ratio", "-1", "robust.max_norm_ratio = -1.0: must be a number >= 0"),
        ("robust.max_update_norm", "0", "robust.max_update_norm = 0.0: must be a number > 0"),
        ("robust.action", "ignore", "robust.action"),
    ],
)
def test_robust_keys_are_validated(key, value, words):
    from fedlora.federation.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(words)):
        load_preset("tiny", {key: value})


def test_robust_section_defaults_to_a_relative_bound():
    bound = load_preset("tiny").robust.bound()
    assert bound.max_ratio == 20.0 and bound.max_norm is None and bound.action == "reject"
    assert load_preset("tiny", {"robust.max_norm_ratio": "0"}).robust.bound().max_ratio is None
