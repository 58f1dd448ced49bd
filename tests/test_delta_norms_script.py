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
    mods = {"model.layers.0.q_proj": (12, 10, 3, 16.0), "model.layers.0.up_proj": (20, 12, 5, 40.0)}
    tensors, ref = {}, 0.0
    for name, (d_out, d_in, r, alpha) in mods.items():
        A, B = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.tensor(A)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.tensor(B)
        ref += float((((alpha / r) * B @ A) ** 2).sum())
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    config = {"lora_alpha": 16.0, "alpha_pattern": {r"model\.layers\.0\.up_proj": 40.0}}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    script = _script()
    assert np.isclose(script.delta_norm(str(adapter)), np.sqrt(ref), rtol=1e-12)
    assert script.main([str(tmp_path / "run")]) == 0
    assert f"{np.sqrt(ref):.3f}" in capsys.readouterr().out
    assert script.main([str(tmp_path / "nothing*")]) == 2
