"""Checkpoint/resume: an interrupted and resumed run reproduces the uninterrupted one exactly."""

from __future__ import annotations

import json

import pytest
import torch

import fedlora.federation.checkpoint as ckpt
from fedlora.engine import RunStopped, deterministic, run_experiment
from fedlora.federation.config import ConfigError, load_preset


def cfg_for(out, name="hetlora", **extra):
    overrides = {
        "output_dir": str(out),
        "rounds": 4,
        "clients_per_round": 2,
        "strategy.name": name,
        "model.dropout": 0.1,  # exercises the RNG
        "data.num_clients": 4,
        "data.tasks": ["wn_antonym", "rt_sentiment", "fortune_author", "wn_part_of_speech"],
        "data.heldout_tasks": [],
        "data.max_examples_per_client": 8,
        "train.local_steps": 2,
        "train.max_length": 40,
        "eval.metrics": ["loss", "accuracy"],
        "eval.max_examples": 4,
        **extra,
    }
    if name == "hetlora":
        overrides["strategy.options"] = {"prune_lambda": 0.1, "gamma": 0.5}
    return load_preset("tiny", overrides)


def stop_after(n):
    def hook(rnd, result):
        if rnd == n:
            raise RunStopped(f"stopped after round {n}")

    return hook


def _rows(path):
    return [deterministic(json.loads(line)) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", ["hetlora", "flexlora", "lora_a2"])
def test_resume_reproduces_uninterrupted_run(tmp_path, name):
    full = run_experiment(cfg_for(tmp_path / "full", name), progress=False, save_final=False)
    cfg = cfg_for(tmp_path / "cut", name)
    with pytest.raises(RunStopped):
        run_experiment(cfg, progress=False, on_round_end=stop_after(2), save_final=False)
    state = ckpt.load_checkpoint(tmp_path / "cut")
    assert state["round"] == 2
    # rows a crash may have written after the checkpoint must not survive the resume
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "round", "round": 3, "junk": True}) + "\n")
    with open(tmp_path / "cut" / "eval_examples.jsonl", "a") as f:
        f.write(json.dumps({"round": 3, "set": "seen_clients", "junk": True}) + "\n")
    torch.manual_seed(999)  # global RNG state must come from the checkpoint, not from here
    resumed = run_experiment(cfg, resume=True, progress=False, save_final=False)
    want = [deterministic(r) for r in full.rows]
    assert [deterministic(r) for r in resumed.rows] == want
    assert _rows(tmp_path / "cut" / "metrics.jsonl") == _rows(tmp_path / "full" / "metrics.jsonl")
    per_example = "eval_examples.jsonl"
    assert _rows(tmp_path / "cut" / per_example) == _rows(tmp_path / "full" / per_example)
    assert len([r for r in want if r["kind"] == "round"]) == 4
    a, b = full.strategy.global_delta(), resumed.strategy.global_delta()
    assert a.keys() == b.keys()
    for m in a:
        assert torch.equal(a[m].A, b[m].A) and torch.equal(a[m].B, b[m].B)


def _close(a, b, rel=1e-3):
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):  # e.g. a round's update_norms
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    return a == b


def test_resume_in_bf16_matches_to_tolerance(tmp_path):
    """bf16 autocast on bf16 base weights (FLoRA's merges then run as side branches)."""
    extra = {"train.precision": "bf16", "model.dtype": "auto"}
    full = run_experiment(cfg_for(tmp_path / "full", "flora", **extra), progress=False)
    cfg = cfg_for(tmp_path / "cut", "flora", **extra)
    with pytest.raises(RunStopped):
        run_experiment(cfg, progress=False, on_round_end=stop_after(2), save_final=False)
    resumed = run_experiment(cfg, resume=True, progress=False, save_final=False)
    want = [deterministic(r) for r in full.rows]
    got = [deterministic(r) for r in resumed.rows]
    assert len(got) == len(want)
    for r, w in zip(got, want):
        assert r.keys() == w.keys()
        assert all(_close(r[k], w[k]) for k in r), (r, w)
    a, b = full.strategy.global_delta(), resumed.strategy.global_delta()
    for m in a:
        torch.testing.assert_close(b[m].delta(), a[m].delta(), rtol=1e-3, atol=1e-6)


def test_resume_refuses_a_different_config(tmp_path):
    cfg = cfg_for(tmp_path / "run", "flexlora", rounds=2)
    with pytest.raises(RunStopped):
        run_experiment(cfg, progress=False, on_round_end=stop_after(1), save_final=False)
    other = cfg_for(tmp_path / "run", "flexlora", rounds=2, **{"train.lr": 0.5})
    with pytest.raises(ConfigError, match=r"train\.lr"):
        run_experiment(other, resume=True, progress=False)
    # the same config resumes fine and finishes
    done = run_experiment(cfg, resume=True, progress=False, save_final=False)
    assert [r["round"] for r in done.round_rows()] == [1, 2]


def test_resume_with_more_rounds_extends_a_finished_run(tmp_path):
    cfg = cfg_for(tmp_path / "run", "flora", rounds=2)
    first = run_experiment(cfg, progress=False, save_final=False)
    more = run_experiment(
        cfg_for(tmp_path / "run", "flora", rounds=3), resume=True, progress=False, save_final=False
    )
    assert [r["round"] for r in more.round_rows()] == [1, 2, 3]
    assert [deterministic(r) for r in more.rows[: len(first.rows)]] == [
        deterministic(r) for r in first.rows
    ]
    with pytest.raises(ConfigError, match=r"rounds = 1: the checkpoint .* is already at round 3"):
        run_experiment(cfg_for(tmp_path / "run", "flora", rounds=1), resume=True, progress=False)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    cfg = cfg_for(tmp_path / "run", "flora", rounds=1)
    out = run_experiment(cfg, resume=True, progress=False, save_final=False)
    assert [r["round"] for r in out.round_rows()] == [1]


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, {"round": 1, "x": torch.arange(5)})

    def full_disk(fd):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "fsync", full_disk)  # after the bytes went to the temp file
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, {"round": 2, "x": torch.arange(7)})
    monkeypatch.undo()
    state = ckpt.load_checkpoint(tmp_path)
    assert state["round"] == 1 and torch.equal(state["x"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]  # no temp left


def test_rng_state_roundtrip():
    import random

    import numpy as np

    gen = np.random.default_rng(3)
    tgen = torch.Generator().manual_seed(4)
    state = ckpt.rng_state(gen=gen, tgen=tgen)
    first = (random.random(), np.random.rand(), torch.rand(1).item(), gen.random(),
             torch.rand(1, generator=tgen).item())  # fmt: skip
    ckpt.set_rng_state(state, gen=gen, tgen=tgen)
    again = (random.random(), np.random.rand(), torch.rand(1).item(), gen.random(),
             torch.rand(1, generator=tgen).item())  # fmt: skip
    assert first == again
