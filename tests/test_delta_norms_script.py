"""`scripts/delta_norms.py` against a dense float64 numpy reference, on a PEFT adapter written
by hand (two modules, one with its own alpha through ``alpha_pattern``)."""

from __future__ import annotations

import json

import numpy as np
import torch
from helpers import load_script
from safetensors.torch import save_file


def _script():
    return load_script("delta_norms")


def test_delta_norm_matches_the_dense_product(tmp_path, capsys):
    rng = np.random.default_rng()
    mods = {  # name: d_out, d_in, r, alpha, whether B moved from its zero start
        "model.layers.0.q_proj": (12, 10, 3, 16.0, True),
        "model.layers.1.q_proj": (12, 10, 3, 16.0, False),
        "model.layers.0.up_proj": (20, 12, 5, 40.0, True),
    }
    tensors, sq = {}, {}
    for name, (d_out, d_in, r, alpha, moved) in mods.items():
        A = rng.standard_normal((r, d_in))
        B = rng.standard_normal((d_out, r)) if moved else np.zeros((d_out, r))
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.tensor(A)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.tensor(B)
        sq[name] = float((((alpha / r) * B @ A) ** 2).sum())
    ref = sum(sq.values())
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    config = {"lora_alpha": 16.0, "alpha_pattern": {r"model\.layers\.0\.up_proj": 40.0}}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    script = _script()
    assert np.isclose(script.delta_norm(str(adapter)), np.sqrt(ref), rtol=1e-12)
    kinds = script.by_kind(script.module_norms(str(adapter)))
    assert kinds.keys() == {"model.layers.*.q_proj", "model.layers.*.up_proj"}
    moved, n, share = kinds["model.layers.*.q_proj"]
    assert (moved, n) == (1, 2) and np.isclose(share, sq["model.layers.0.q_proj"] / ref)
    assert kinds["model.layers.*.up_proj"][:2] == (1, 1)
    assert script.main(["--kinds", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"{np.sqrt(ref):.3f}" in out and "modules moved: 2 of 3" in out
    assert "model.layers.*.q_proj: 1 of 2 moved" in out
    assert script.main([str(tmp_path / "nothing*")]) == 2
