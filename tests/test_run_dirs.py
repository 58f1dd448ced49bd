"""Issue 18: run directories are locked and never clobber a user's files; damaged state is
detected (checkpoint checksum, checked values, torn JSONL lines); the checkpoint's size is flat
in the number of rounds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fedlora.federation.checkpoint as ckpt
from fedlora.cli import commands as cli
from fedlora.engine import run_experiment
from fedlora.federation import runfiles
from fedlora.federation.config import load_preset
from fedlora.federation.runfiles import LOCK, MARKER

FAST = [
    "--rounds", "1", "--clients_per_round", "2", "--data.num_clients", "4",
    "--train.local_steps", "1", "--train.max_length", "32", "--eval.max_examples", "2",
    "--eval.metrics", '["loss"]', "--eval.per_task", "false",
]  # fmt: skip
SRC = str(Path(__file__).resolve().parent.parent / "src")


def _run(out, *extra) -> list[str]:
    return ["run", "--preset", "tiny", "-q", "--output-dir", str(out), *FAST, *extra]


def _digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(d.rglob("*"))
    }


def _one_error(capsys, *words) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fedlora: error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(_run(out)) == 0
    return out


def _copy(finished: Path, to: Path) -> Path:
    shutil.copytree(finished, to)
    return to


# -- the lock ------------------------------------------------------------------------------


def test_a_second_run_into_a_directory_in_use_is_refused(tmp_path, capsys):
    """A first run (another process) is training in `out`; a second `fedlora run --overwrite`
    into it (which, unprotected, clears the directory and runs) is refused, and so is a
    resume; the first is then interrupted, and its files are intact: it resumes."""
    import signal

    out = tmp_path / "run"
    # far more rounds than the test lasts (a tiny round takes milliseconds): the first run
    # must still be training when it is interrupted, however loaded the machine is
    argv = _run(out, "--rounds", "100000", "--clients_per_round", "1", "--eval.every", "100000")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # a shell's background job (nohup ... &) starts with SIGINT ignored, and Python keeps an
    # ignored SIGINT ignored: restore the default so the child gets its KeyboardInterrupt
    first = subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", *argv], env=env, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert cli.main([*argv, "--overwrite"]) == 2
        _one_error(capsys, str(out), "in use by another fedlora run", f"pid {first.pid}")
        assert cli.main(["run", "--resume", str(out), "-q"]) == 2
        _one_error(capsys, "in use by another fedlora run")
        assert first.poll() is None  # the first was running all along
    finally:
        first.send_signal(signal.SIGINT)
        try:
            code = first.wait(timeout=300)
        except subprocess.TimeoutExpired:  # never leave it training after the test
            first.kill()
            first.wait()
            raise
    assert code == 130, first.stderr.read()
    done = ckpt.load_checkpoint(out)["round"]
    assert 2 <= done < 100000
    # released on exit, and intact: it resumes and continues
    assert cli.main(["run", "--resume", str(out), "-q", "--rounds", str(done + 1)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["kind"] == "round"] == list(range(1, done + 2))


def test_the_lock_is_released_when_a_run_fails(tmp_path):
    cfg = load_preset("tiny", {"output_dir": str(tmp_path / "r"), "rounds": 1})

    def boom(rnd, spec, u):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, progress=False, on_update=boom)
    run_experiment(cfg, progress=False, resume=True)  # not locked any more
    assert (tmp_path / "r" / LOCK).is_file() and (tmp_path / "r" / MARKER).is_file()


# -- the marker and the manifest ---------------------------------------------------------------


def _user_folder(d: Path) -> Path:
    d.mkdir()
    (d / "config.toml").write_text('name = "my own settings"\n')
    (d / "adapter").mkdir()
    (d / "adapter" / "weights.bin").write_bytes(os.urandom(64))
    (d / "plots").mkdir()
    (d / "plots" / "figure.png").write_bytes(os.urandom(32))
    return d


def test_a_users_folder_is_left_byte_identical(tmp_path, capsys):
    folder = _user_folder(tmp_path / "mine")
    before = _digest(folder)
    assert cli.main(_run(folder)) == 2
    _one_error(capsys, str(folder), "not a fedlora run directory", "--allow-nonempty")
    assert cli.main(_run(folder, "--overwrite")) == 2
    _one_error(capsys, "not a fedlora run directory")
    assert cli.main(["run", "--resume", str(folder), "-q"]) == 2
    _one_error(capsys, "not a fedlora run directory")
    assert cli.main(_run(folder, "--allow-nonempty")) == 2  # it holds names a run writes
    _one_error(capsys, "config.toml, adapter, plots", "which a run writes")
    assert _digest(folder) == before


def test_overwrite_removes_only_what_fedlora_wrote(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert cli.main(_run(folder, "--allow-nonempty")) == 0
    manifest = json.loads((folder / MARKER).read_text())["files"]
    assert "notes.txt" not in manifest and "metrics.jsonl" in manifest
    (folder / "later.txt").write_text("added after the run")
    assert cli.main(_run(folder, "--seed", "3")) == 2  # it holds a run now
    _one_error(capsys, "already holds a run", "--overwrite")
    assert cli.main(_run(folder, "--seed", "3", "--overwrite")) == 0
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "later.txt").read_text() == "added after the run"


def test_output_dir_that_is_a_file_or_read_only(tmp_path, capsys, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(_run(f)) == 2
    _one_error(capsys, str(f), "not a directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes into read-only directories: the OS's answer, faked

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(runfiles, "open", refuse, raising=False)
    try:
        assert cli.main(_run(ro)) == 2
        _one_error(capsys, str(ro), "cannot write there: Permission denied")
    finally:
        ro.chmod(0o755)


# -- checked state -------------------------------------------------------------------------


def test_a_byte_flipped_checkpoint_is_refused(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "flipped")
    path = run / ckpt.CHECKPOINT
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(64):  # 64 bytes of the tensors' data
        data[header + 16 + i] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cli.main(["run", "--resume", str(run), "-q", "--rounds", "2"]) == 2
    _one_error(capsys, f"{path}: checksum mismatch (damaged)")


@pytest.mark.parametrize(
    "what, words",
    [
        ("nan", "holds NaN or Inf"),
        ("rng", "malformed RNG state"),
        ("round", "round = -5"),
        ("rows", "does not match the checkpoint"),
    ],
)
def test_damaged_values_are_refused_by_name(finished, tmp_path, capsys, what, words):
    """Values a checkpoint holds are checked even when its checksum is right (rewritten)."""
    run = _copy(finished, tmp_path / what)
    state = ckpt.load_checkpoint(run)
    state.pop("format")
    if what == "nan":
        t = next(v for v in _tensors(state["strategy"]) if v.is_floating_point() and v.numel())
        t.view(-1)[0] = float("nan")
    elif what == "rng":
        state["rng"]["numpy"] = ("MT19937", [1, 2, 3], 0, 0, 0.0)
    elif what == "round":
        state["round"] = -5
    else:
        state["rows"]["sha256"] = "0" * 64
    ckpt.save_checkpoint(run, state)
    assert cli.main(["run", "--resume", str(run), "-q", "--rounds", "2"]) == 2
    _one_error(capsys, words)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif hasattr(x, "__dict__"):
        yield from _tensors(vars(x))


def test_torn_last_lines_are_repaired_on_resume(finished, tmp_path):
    run = _copy(finished, tmp_path / "torn")
    for name in ("eval_examples.jsonl", "metrics.jsonl"):
        with open(run / name, "ab") as f:
            f.write(b'{"round": 2, "set": "seen_cli')
    assert cli.main(["run", "--resume", str(run), "-q", "--rounds", "2"]) == 0
    for name in ("eval_examples.jsonl", "metrics.jsonl"):
        rows = [json.loads(line) for line in (run / name).read_text().splitlines()]
        assert sorted({r["round"] for r in rows}) == [1, 2]


def test_the_checkpoint_size_is_flat_in_rounds(tmp_path):
    """200 rounds of the tiny preset: the checkpoint no longer carries every metrics row (it
    grew ~2.3 KB a round before issue 18). Homogeneous ranks keep the strategy's own state one
    size; what is left is digits (round, totals, the norm history's window of 10)."""
    cfg = load_preset(
        "tiny",
        {
            "output_dir": str(tmp_path / "long"),
            "rounds": 200,
            "clients_per_round": 1,
            "resources.distribution": "homogeneous",
            "resources.homogeneous_rank": 2,
            "train.local_steps": 1,
            "train.max_length": 16,
            "eval.every": 1000,
            "eval.max_examples": 1,
            "eval.metrics": ["loss"],
            "eval.per_task": False,
        },
    )
    sizes = {}

    def size(rnd, result):
        sizes[rnd] = (tmp_path / "long" / ckpt.CHECKPOINT).stat().st_size

    run_experiment(cfg, progress=False, on_round_end=size, save_final=False)
    late, early = [sizes[r] for r in range(100, 201)], [sizes[r] for r in range(11, 21)]
    assert max(late) - min(early) <= 100, (min(early), max(late))


# -- every remaining bad input is one line (issue 18, item 6) ---------------------------------


@pytest.fixture
def bad_inputs(tmp_path, finished):
    t = tmp_path
    (t / "self.toml").write_text('extends = "self.toml"\nrounds = 2\n')
    (t / "a.toml").write_text('extends = "b.toml"\n')
    (t / "b.toml").write_text('extends = "a.toml"\n')
    (t / "latin.toml").write_bytes(b'name = "\xe9t\xe9"\n')
    (t / "two.toml").write_text('extends = "tiny"\nroundz = 2\n[train]\nlrr = 1\n')

    def data(name, content: bytes):
        (t / name).write_bytes(content)
        return [*_run(t / f"out-{name}"), "--data.source", str(t / name)]

    row = '{{"instruction": "a", "output": {}}}\n'
    return {
        "extends itself": (["run", "--config", str(t / "self.toml")],
                           ["self.toml", "extends itself"]),
        "extends cycle": (["run", "--config", str(t / "a.toml")], ["a.toml", "extends itself"]),
        "TOML not UTF-8": (["run", "--config", str(t / "latin.toml")], ["latin.toml", "UTF-8"]),
        "two unknown keys": (["run", "--config", str(t / "two.toml")],
                             ["2 unknown keys", "'roundz'", "'train.lrr'"]),
        "two unknown --set": ([*_run(t / "o"), "--set", "roundz=2", "--set", "train.lrr=1"],
                              ["2 unknown keys", "'roundz'", "'train.lrr'"]),
        "lone surrogate": (data("s.jsonl", (row.format('"\\ud800x"') * 8).encode()),
                           ["s.jsonl, row 0", "'output'", "invalid Unicode"]),
        "output null": (data("n.jsonl", (row.format("null") * 8).encode()),
                        ["n.jsonl, row 0", "'output' is null"]),
        "output number": (data("i.jsonl", (row.format("123") * 8).encode()),
                          ["i.jsonl, row 0", "'output' must be text, got int"]),
        "output object": (data("d.jsonl", (row.format('{"x": 1}') * 8).encode()),
                          ["d.jsonl, row 0", "'output' must be text, got dict"]),
        "resume with preset": (["run", "--resume", str(finished), "--preset", "tiny"],
                               ["--resume", "--preset would be ignored"]),
        "resume with config": (["run", "--resume", str(finished), "--config",
                                str(t / "two.toml")], ["--config would be ignored"]),
        "split=foo": ([*_run(t / "f"), "--set", "strategy.options.split=foo"],
                      ["strategy.options.split = 'foo'", "'B' or 'sqrt'"]),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        "extends itself",
        "extends cycle",
        "TOML not UTF-8",
        "two unknown keys",
        "two unknown --set",
        "lone surrogate",
        "output null",
        "output number",
        "output object",
        "resume with preset",
        "resume with config",
        "split=foo",
    ],
)
def test_bad_input_is_one_line(case, bad_inputs, capsys, monkeypatch):
    import fedlora.federation.build as build

    def no_model(*a, **k):  # every case is refused before a model loads
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(build, "load_base_model", no_model)
    argv, words = bad_inputs[case]
    assert cli.main(argv) == 2
    _one_error(capsys, *words)


def test_a_large_csv_field_is_read(tmp_path):
    from fedlora.data.examples import load_examples

    big = "x" * 300_000
    (tmp_path / "big.csv").write_text(f"instruction,output\nsummarise,{big}\n")
    (ex,) = load_examples(tmp_path / "big.csv")
    assert ex.output == big


def test_bf16_on_a_cpu_without_bf16_units_is_said_once(monkeypatch, caplog):
    import fedlora.clients.device as device
    import fedlora.federation.build as build

    monkeypatch.setattr(device, "native_bf16", lambda d: False)
    monkeypatch.setattr(build, "_SAID", set())
    cfg = load_preset("tiny", {"train.precision": "bf16"})
    with caplog.at_level("WARNING", logger="fedlora.federation"):
        build.placement(cfg)
        build.placement(cfg)
        build.placement(load_preset("tiny", {"train.precision": "auto"}))  # auto: fp32, quiet
    said = [r for r in caplog.records if "without bfloat16 units" in r.getMessage()]
    assert len(said) == 1


# -- issue 27: the manifest file by file, the lock on the directory, one mode ---------------


def test_overwrite_keeps_a_users_files_inside_a_run_directory(tmp_path):
    """A user's own ``merged/``, ``tracking.json`` and ``plots/fig1.png`` in a fedlora run
    directory survive ``--overwrite`` byte-identical (before issue 27 the manifest claimed
    every output name up front, and they were deleted): the run never wrote them."""
    out = tmp_path / "run"
    assert cli.main(_run(out)) == 0
    (out / "merged").mkdir()
    (out / "merged" / "model.safetensors").write_bytes(os.urandom(64))
    (out / "tracking.json").write_text('{"mine": true}\n')
    (out / "plots" / "fig1.png").write_bytes(os.urandom(32))
    mine = {p: (out / p).read_bytes() for p in ("merged/model.safetensors", "tracking.json",
                                                "plots/fig1.png")}  # fmt: skip
    (out / "plots" / "curves.png").write_bytes(b"the old run's")  # the run's own file
    assert cli.main(_run(out, "--seed", "5", "--overwrite")) == 0
    for p, data in mine.items():
        assert (out / p).read_bytes() == data, p
    assert (out / "plots" / "curves.png").read_bytes() != b"the old run's"  # rewritten
    files = runfiles.claimed(out)
    assert "plots/curves.png" in files and "adapter/adapter_model.safetensors" in files
    assert not {"merged", "tracking.json", "plots", "adapter", "tensorboard"} & set(files)
    assert not set(mine) & set(files)


def test_resume_of_a_finished_run_without_its_checkpoint_is_refused(finished, tmp_path, capsys):
    """Before issue 27 it restarted at round 1 and rewrote metrics.jsonl (an INFO line)."""
    run = _copy(finished, tmp_path / "nockpt")
    (run / ckpt.CHECKPOINT).unlink()
    before = _digest(run)
    assert cli.main(["run", "--resume", str(run), "-q", "--rounds", "2"]) == 2
    _one_error(capsys, str(run), "checkpoint.safetensors is missing", "metrics.jsonl holds")
    after = _digest(run)
    assert {k: v for k, v in after.items() if k != LOCK} == {
        k: v for k, v in before.items() if k != LOCK
    }


def test_deleting_the_lock_file_does_not_unlock_the_directory(tmp_path):
    """Before issue 27 the lock was on ``.fedlora.lock``: deleting it during a run let a
    second run in (rounds duplicated in metrics.jsonl). Now the directory itself is locked."""
    out = tmp_path / "run"
    lock = runfiles.hold(out, resume=False, overwrite=False)
    try:
        (out / LOCK).unlink()
        with pytest.raises(runfiles.FedLoraError, match="in use by another fedlora run"):
            runfiles.hold(out, resume=True, overwrite=False)
    finally:
        lock.release()
    runfiles.hold(out, resume=True, overwrite=False).release()  # released: free again


def test_every_output_has_the_same_mode(tmp_path):
    """Every file a run writes is 0666 minus the umask, the adapter's included (safetensors
    made it 0600 before issue 27), every folder it makes 0777 minus the umask."""
    out = tmp_path / "run"
    assert cli.main(_run(out)) == 0
    want_file, want_dir = 0o666 & ~ckpt._umask(), 0o777 & ~ckpt._umask()
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    for name, mode in modes.items():
        want = want_dir if (out / name).is_dir() else want_file
        assert mode == want, (name, oct(mode))


def test_an_older_manifest_listing_folders_leaves_them(tmp_path, caplog):
    """A marker of fedlora before issue 27 lists folders (``plots``): what is in them is not
    known to be fedlora's, so --overwrite leaves them and says so; its files go."""
    import logging

    out = tmp_path / "old"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "fig1.png").write_bytes(b"mine")
    (out / "metrics.jsonl").write_text("{}\n")
    (out / MARKER).write_text(json.dumps({"fedlora_run": 1, "files": ["metrics.jsonl", "plots"]}))
    with caplog.at_level(logging.INFO):
        runfiles.clear_claimed(out, logging.getLogger("fedlora"))
    assert not (out / "metrics.jsonl").exists()
    assert (out / "plots" / "fig1.png").read_bytes() == b"mine"
    assert runfiles.claimed(out) == ["plots"]
    assert any("left plots" in r.getMessage() for r in caplog.records)
