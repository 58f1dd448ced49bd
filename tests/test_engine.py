"""The in-process engine on a tiny random model: every strategy, files, bytes, exactness."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fedlora.strategies as registry
from fedlora.engine import run_experiment
from fedlora.federation.config import load_preset

HOMOGENEOUS = {"resources.distribution": "homogeneous", "resources.homogeneous_rank": 2}


def tiny_cfg(tmp_path, **overrides):
    base = {
        "output_dir": str(tmp_path / "run"),
        "rounds": 2,
        "clients_per_round": 2,
        "data.num_clients": 4,
        "data.tasks": ["wn_antonym", "rt_sentiment", "fortune_author", "wn_part_of_speech"],
        "data.heldout_tasks": [],
        "data.max_examples_per_client": 8,
        "train.local_steps": 1,
        "train.max_length": 40,
        "eval.metrics": ["loss"],
        "eval.max_examples": 4,
        "eval.per_task": False,
    }
    base.update(overrides)
    return load_preset("tiny", base)


@pytest.mark.parametrize("name", registry.names())
def test_two_rounds_of_every_strategy(tmp_path, name):
    extra = HOMOGENEOUS if name in ("fedit", "fedex_lora") else {}
    cfg = tiny_cfg(tmp_path, **{"strategy.name": name, **extra})
    ranks = set()
    result = run_experiment(
        cfg, progress=False, on_update=lambda r, s, u: ranks.add(tuple(s.ranks.values()))
    )
    if not extra:
        assert len(ranks) > 1, "the clients should have had heterogeneous ranks"
    rounds = result.round_rows()
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["bytes_up"] > 0 and r["replies"] == 2 and np.isfinite(r["train_loss"])
    assert rounds[0]["bytes_down"] >= 0 and rounds[1]["bytes_down"] > 0  # round 2 gets the model
    evals = result.eval_rows("seen_clients")
    assert [r["round"] for r in evals] == [1, 2] and all(np.isfinite(r["loss"]) for r in evals)
    delta = result.strategy.global_delta()
    assert delta and any(float(f.delta().abs().max()) > 0 for f in delta.values())


def test_run_dir_files(tmp_path):
    cfg = tiny_cfg(
        tmp_path,
        **{"rounds": 3, "eval.every": 2, "data.heldout_clients": 0.25, "data.num_clients": 5,
           "data.tasks": ["wn_antonym", "rt_sentiment", "fortune_author", "wn_part_of_speech",
                          "chat_emotion"],
           "data.heldout_tasks": ["chat_emotion"], "eval.metrics": ["loss", "accuracy"]},
    )  # fmt: skip
    result = run_experiment(cfg, progress=False)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(result.rows))
    kinds = [(r["kind"], r["round"], r.get("set")) for r in rows]
    # eval every 2 rounds and after the last one, on seen, unseen clients and unseen tasks
    expected = [("round", 1, None), ("round", 2, None)]
    expected += [("eval", 2, s) for s in ("seen_clients", "unseen_clients", "unseen_tasks")]
    expected += [("round", 3, None)]
    expected += [("eval", 3, s) for s in ("seen_clients", "unseen_clients", "unseen_tasks")]
    assert kinds == expected
    assert all(r["bytes_up"] > 0 for r in rows if r["kind"] == "round")
    held = {str(c) for c in range(5)} - {
        c for r in rows if r["kind"] == "round" for c in r["clients"]
    }
    assert held, "a held-out client must never be sampled"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bytes_total"] == summary["bytes_up"] + summary["bytes_down"] > 0
    assert 0 < summary["comm_ratio_vs_full_ft"] < 1
    assert summary["rounds"] == 3 and "unseen_tasks" in summary["final"]
    assert (run / "config.toml").read_text().count("[model]") == 1
    assert load_preset("tiny") != cfg and (run / "adapter" / "adapter_config.json").is_file()


def test_saved_adapter_loads_with_peft(tmp_path):
    import torch
    from peft import PeftModel

    from fedlora.clients.models import LoraHost, default_target_modules
    from fedlora.clients.tiny import build_tiny

    cfg = tiny_cfg(tmp_path, rounds=1)
    result = run_experiment(cfg, progress=False)
    model, tok = build_tiny("tiny-llama")
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "run" / "adapter"))
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    fresh, _ = build_tiny("tiny-llama")
    host = LoraHost(fresh, default_target_modules(fresh))
    with host.use_global(result.strategy.global_delta()) as g, torch.no_grad():
        want = g(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name", ["flexlora", "flora"])
def test_one_round_global_delta_is_exact(tmp_path, name):
    captured = []
    cfg = tiny_cfg(tmp_path, **{"strategy.name": name, "rounds": 1, "clients_per_round": 3})
    result = run_experiment(cfg, progress=False, on_update=lambda r, s, u: captured.append(u))
    assert len(captured) == 3 and len({u.adapter[m].rank for u in captured for m in u.adapter}) > 1
    n = np.array([u.num_examples for u in captured], dtype=np.float64)
    p = n / n.sum()
    delta = result.strategy.global_delta()
    for module, f in delta.items():
        ref = sum(
            pk * u.adapter[module].scale
            * (u.adapter[module].B.double().numpy() @ u.adapter[module].A.double().numpy())
            for pk, u in zip(p, captured)
        )  # fmt: skip
        got = f.scale * (f.B.double().numpy() @ f.A.double().numpy())
        assert np.linalg.norm(ref) > 0
        assert np.linalg.norm(got - ref) <= 1e-10 * np.linalg.norm(ref), module


def test_sampling_is_seeded(tmp_path):
    a = run_experiment(tiny_cfg(tmp_path / "a", rounds=2), progress=False, save_final=False)
    b = run_experiment(tiny_cfg(tmp_path / "b", rounds=2), progress=False, save_final=False)
    c = run_experiment(tiny_cfg(tmp_path / "c", rounds=2, seed=5), progress=False)
    clients = [[r["clients"] for r in x.round_rows()] for x in (a, b, c)]
    assert clients[0] == clients[1]
    assert a.round_rows()[1]["train_loss"] == b.round_rows()[1]["train_loss"]
    assert all(len(set(cs)) == len(cs) for cs in clients[0])  # without replacement
    assert clients[2] != clients[0] or c.specs != a.specs
