"""Privacy claims checked by the attacks and runs they are about: LoRA-A2's slot choice under
local DP, client sampling as the accountant assumes it, adaptive clipping, and a run whose
rounds grow keeping its sigma and its ledger consistent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import llama_host

import fedlora.strategies as S
from fedlora import ClientSpec
from fedlora.clients.train import TrainConfig, train_client
from fedlora.core.accounting import epsilon
from fedlora.core.privacy import AdaptiveClip, CentralDP, LocalDP
from fedlora.engine import RunStopped, run_experiment
from fedlora.federation.config import load_preset


def _batch(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 128, (6 + i % 3,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def _a2_slots(masked: bool, data: list[dict], privacy) -> dict[str, list[int]]:
    host = llama_host()
    shapes = host.shapes()
    strategy = S.get("lora_a2", shapes=shapes, seed=1, global_rank=4, masked_training=masked)
    spec = ClientSpec("0", {m: 1 for m in shapes}, alpha=8.0)
    payload = strategy.configure(spec, 1)
    cfg = TrainConfig(local_steps=2, batch_size=2, lr=1e-2)
    u = train_client(host, spec, payload, data, cfg, server_round=1, privacy=privacy)
    return {m: sorted(int(i) for i in idx) for m, idx in u.extras["slots"].items()}


def test_lora_a2_slots_under_local_dp_with_a_huge_sigma_do_not_depend_on_the_data():
    """Replace one training example. Under local DP (masked_training off: slots come from the
    DP-trained update) with sigma = 1e6 and the same client noise, the chosen slots are the
    same; the unprotected masked probe (a noise-free gradient on the data) changes them."""
    data = _batch(2, 0)  # one batch of 2: the probe's first step sees both examples
    other = data[:1] + _batch(1, 99)
    dp = LocalDP(1.0, 1e6, secret=123)
    assert _a2_slots(False, data, dp) == _a2_slots(False, other, dp)
    assert _a2_slots(True, data, None) != _a2_slots(True, other, None)


def _tiny(tmp_path, **extra):
    return load_preset(
        "tiny",
        {
            "output_dir": str(tmp_path),
            "strategy.name": "flexlora",
            "privacy.mode": "central",
            "privacy.clip_norm": 0.5,
            "privacy.noise_multiplier": 1.0,
            "eval.metrics": ["loss"],
            "eval.max_examples": 4,
            **extra,
        },
    )


def test_poisson_client_sampling_is_what_the_add_remove_accountant_assumes(tmp_path):
    """Each of the 6 training clients independently with q = 2/6: the number per round
    varies, a round that draws nobody still releases (noise) and is accounted, and epsilon
    is the add/remove accountant's over every round. Fixed sampling draws exactly 2 and is
    accounted under replace-one."""
    r = run_experiment(
        _tiny(tmp_path / "p", rounds=12, clients_per_round=2), progress=False, save_final=False
    )
    rows = r.round_rows()
    counts = [len(x["clients"]) for x in rows]
    assert len(set(counts)) > 1 and all(x["aggregated"] for x in rows)
    p = r.summary["privacy"]
    assert p["neighbouring_relation"] == "add_remove" and p["rounds_accounted"] == 12
    assert p["epsilon"] == pytest.approx(epsilon([(1.0, 2 / 6, 12)], p["delta"]))
    f = run_experiment(
        _tiny(tmp_path / "f", rounds=3, clients_per_round=2, **{"privacy.sampling": "fixed"}),
        progress=False,
        save_final=False,
    )
    assert [len(x["clients"]) for x in f.round_rows()] == [2, 2, 2]
    q = f.summary["privacy"]
    assert q["neighbouring_relation"] == "replace_one"
    want = epsilon([(1.0, 2 / 6, 3)], q["delta"], "rdp", "replace_one")
    assert q["epsilon"] == pytest.approx(want)


def test_adaptive_clip_norm_follows_the_quantile_of_the_update_norms():
    """Andrew et al.'s update C <- C exp(-lr (b - gamma)): with the norms 1..10 every round
    and a negligible count noise, C settles at the median; the update's noise multiplier is
    (z^-2 - (2 sigma_b)^-2)^-1/2."""
    dp = CentralDP(0.1, 1.0, 10, secret=3, adaptive=AdaptiveClip(0.5, 0.2, 1e-6))
    for rnd in range(1, 200):
        for n in range(1, 11):
            dp.clip(float(n))
        dp.end_round(rnd)
    assert 5.0 <= dp.clip_norm <= 6.0
    adaptive = AdaptiveClip(0.5, 0.2, 2.0)
    assert adaptive.update_multiplier(1.0) == pytest.approx((1 - 1 / 16) ** -0.5)
    with pytest.raises(Exception, match="adaptive_count_noise"):
        AdaptiveClip(0.5, 0.2, 0.4).update_multiplier(1.0)


def test_an_adaptive_run_moves_its_clip_norm_and_resumes_it(tmp_path):
    cfg = _tiny(tmp_path, rounds=3, **{"privacy.clip_norm": "adaptive"})

    def stop(rnd, result):
        if rnd == 2:
            raise RunStopped("cut")

    with pytest.raises(RunStopped):
        run_experiment(cfg, progress=False, on_round_end=stop, save_final=False)
    r = run_experiment(cfg, resume=True, progress=False, save_final=False)
    clips = [x["dp_clip_norm"] for x in r.round_rows()]
    assert clips[0] == 0.1 and len(set(clips)) == 3  # the initial clip, then it moved
    assert r.summary["privacy"]["adaptive_clip_norm"] not in clips  # the next round's


def test_growing_rounds_keeps_the_sigma_the_ledger_was_accounted_with(tmp_path):
    """A run solved for epsilon 8 over 2 rounds, resumed with rounds = 4: the mechanism keeps
    the checkpointed sigma (a newly solved, larger one would make the ledger lie), and the
    reported epsilon is the accountant's for that sigma over 4 rounds."""
    extra = {"privacy.noise_multiplier": None, "privacy.target_epsilon": 8.0}
    first = run_experiment(_tiny(tmp_path, rounds=2, **extra), progress=False, save_final=False)
    sigma = first.summary["privacy"]["noise_multiplier"]
    more = run_experiment(
        _tiny(tmp_path, rounds=4, **extra), resume=True, progress=False, save_final=False
    )
    p = more.summary["privacy"]
    assert p["noise_multiplier"] == sigma and more.strategy.privacy.noise_multiplier == sigma
    assert p["epsilon"] == pytest.approx(epsilon([(sigma, 3 / 6, 4)], p["delta"]))
    assert p["epsilon"] > 8.0 > first.summary["privacy"]["epsilon"] * 0.9
    assert math.isfinite(p["epsilon"])


def test_local_dp_rows_carry_no_raw_losses(tmp_path):
    # fixed sampling: Poisson's draw from the OS-drawn secret is empty with probability 1/64
    cfg = _tiny(tmp_path, rounds=1, **{"privacy.mode": "local", "privacy.sampling": "fixed"})
    r = run_experiment(cfg, progress=False, save_final=False)
    (row,) = r.round_rows()
    assert row["train_loss"] is None and row["used"] > 0
    assert np.isfinite(r.summary["privacy"]["epsilon"])
