"""Every shipped preset runs as shipped: one short round each, with its own data, partition,
clients, resources and strategy; only the amount of work is cut (and SmolLM2 is replaced by
the tiny random Llama, MiniLM is the real model)."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.data import load_builtin
from fedlora.engine import run_experiment
from fedlora.federation.config import load_preset, preset_names

STAND_IN = {"smollm2": "tiny-llama"}  # too slow for CI; minilm (22M) runs for real
PRESETS = [
    pytest.param(n, marks=pytest.mark.real_model) if load_preset(n).model.name == "minilm" else n
    for n in preset_names()
]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_one_short_round_as_shipped(tmp_path, name):
    shipped = load_preset(name)
    cfg = load_preset(
        name,
        {
            "output_dir": str(tmp_path / name),
            "rounds": 1,
            "threads": 1,
            "model.name": STAND_IN.get(shipped.model.name, shipped.model.name),
            "data.max_examples_per_client": 8,
            "train.local_steps": 1,
            "train.max_length": 32,
            "eval.max_examples": 4,
            "eval.max_new_tokens": 2,
            "eval.per_task": False,
        },
    )
    result = run_experiment(cfg, progress=False, save_final=False)
    (row,) = result.round_rows()
    assert row["replies"] == shipped.sampled_per_round() and np.isfinite(row["train_loss"])
    assert all(np.isfinite(r["loss"]) for r in result.eval_rows() if "loss" in r)
    if shipped.model.kind == "classifier":  # the head is trained and federated by default
        assert result.strategy.dense


def test_lora_a2_paper_mirrors_the_papers_setting():
    cfg = load_preset("lora_a2_paper")
    labels = {e.label for e in load_builtin(cfg.data.tasks) if e.label is not None}
    assert len(labels) >= 20  # a many-class task (the paper: BANKING77, 20 Newsgroups)
    assert cfg.data.partition == "dirichlet" and cfg.data.num_clients == 30
    assert cfg.train.b_lr_multiplier == 5.0 and cfg.train.lr == 5e-4 and cfg.train.epochs == 5
    assert cfg.rounds == 50 and cfg.strategy.options["global_rank"] == 8
    assert cfg.model.modules_to_save is None  # the default: the classifier head is trained
