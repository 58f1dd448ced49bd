"""Differential privacy (`fedlora.core.privacy`): clipping, noise and accounting against independent
references (float64 numpy, the analytic Gaussian mechanism, Opacus's own step API), and the
strategies' central-DP aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import SHAPES, np_delta, random_update, spec

import fedlora.strategies as S
from fedlora import ClientUpdate, LoraFactors
from fedlora.core.privacy import (
    CentralDP,
    PrivacyLedger,
    attach_central,
    clip_factor_update,
    delta_update_terms,
    epsilon,
    noise_multiplier_for,
    plan,
)
from fedlora.federation.config import ConfigError, load_preset

F64 = torch.float64


def _pair(rng, ranks, start_zero_b=False):
    s = spec("7", ranks, alpha=8.0)
    start = random_update(rng, s).adapter
    if start_zero_b:
        start = {m: LoraFactors(f.A, torch.zeros_like(f.B), f.scale) for m, f in start.items()}
    sent = random_update(rng, s, n=5)
    return sent, start


# -- clipping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.3, 3.0, 1e6])
def test_delta_clipping_in_factored_form_equals_clipping_the_dense_delta(clip):
    rng = np.random.default_rng(1)
    sent, start = _pair(rng, {"attn": 3, "mlp": 5})
    # dense float64 reference: D - T over all modules, clipped to `clip`, added back to T
    diffs = {m: np_delta(sent.adapter[m]) - np_delta(start[m]) for m in SHAPES}
    norm = math.sqrt(sum(float((d**2).sum()) for d in diffs.values()))
    c = min(1.0, clip / norm)
    terms, got_norm = delta_update_terms(sent, start, clip)
    assert got_norm == pytest.approx(norm, rel=1e-10)
    for m in SHAPES:
        want = np_delta(start[m]) + c * diffs[m]
        got = sum(w * (G @ A).numpy() for G, A, w in terms[m])
        assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max()
    clipped = math.sqrt(
        sum(
            float(
                ((sum(w * (G @ A).numpy() for G, A, w in terms[m]) - np_delta(start[m])) ** 2).sum()
            )
            for m in SHAPES
        )
    )
    assert clipped <= clip * (1 + 1e-9) and (clipped == pytest.approx(norm) or c < 1)


@pytest.mark.parametrize("parts", ["AB", "B"])
def test_factor_clipping_clips_the_concatenated_factor_update(parts):
    rng = np.random.default_rng(2)
    sent, start = _pair(rng, {"attn": 2, "mlp": 4})
    if parts == "B":  # FFA-LoRA: A is the shared start's
        sent = ClientUpdate(
            sent.client_id,
            {m: LoraFactors(start[m].A, f.B, f.scale) for m, f in sent.adapter.items()},
            5,
        )
    vec = []
    for m in SHAPES:
        f, s = sent.adapter[m], start[m]
        if "A" in parts:
            vec.append((f.A.double() - s.A.double()).numpy().ravel())
        vec.append((f.scale * f.B.double() - s.scale * s.B.double()).numpy().ravel())
    v = np.concatenate(vec)
    clip = 0.25 * np.linalg.norm(v)
    out, norm = clip_factor_update(sent, start, clip, parts)
    assert norm == pytest.approx(np.linalg.norm(v), rel=1e-9)
    for m in SHAPES:
        f, s = out.adapter[m], start[m]
        want_G = s.scale * s.B.double() + 0.25 * (
            sent.adapter[m].scale * sent.adapter[m].B.double() - s.scale * s.B.double()
        )
        assert torch.allclose(f.scale * f.B.double(), want_G, atol=1e-6)
        if "A" in parts:
            want_A = s.A.double() + 0.25 * (sent.adapter[m].A.double() - s.A.double())
            assert torch.allclose(f.A.double(), want_A, atol=1e-6)
        assert f.rank == sent.adapter[m].rank and f.scale == sent.adapter[m].scale


# -- noise ------------------------------------------------------------------------------------


def test_noise_std_matches_the_mechanism_and_is_seeded():
    dp = CentralDP(clip_norm=0.5, noise_multiplier=1.3, clients_per_round=4, seed=11)
    x = dp.noise((400, 500), 3, "G/m")
    assert x.std().item() == pytest.approx(1.3 * 0.5 / 4, rel=0.01)
    assert abs(x.mean().item()) < 5 * dp.noise_std / math.sqrt(x.numel())
    assert torch.equal(x, dp.noise((400, 500), 3, "G/m"))
    assert not torch.equal(x, dp.noise((400, 500), 4, "G/m"))
    assert not torch.equal(x, dp.noise((400, 500), 3, "A/m"))


def _run_round(strategy, specs, rng, rnd, send_start=False):
    updates = []
    for s in specs:
        p = strategy.configure(s, rnd)
        from fedlora.core.contract import payload_start

        start = payload_start(s, p, strategy.shapes, strategy.name)
        if send_start:
            adapter = {m: LoraFactors(f.A.float(), f.B.float(), f.scale) for m, f in start.items()}
        else:
            adapter = {}
            for m, f in start.items():
                A = f.A.float() + (0.1 * torch.randn_like(f.A.float()) if "A" in p.trainable else 0)
                B = f.B.float() + (0.1 * torch.randn_like(f.B.float()) if "B" in p.trainable else 0)
                adapter[m] = LoraFactors(A, B, f.scale)
        extras = {}
        if "budget" in p.extras:
            from fedlora.strategies.lora_a2 import masked_upload, select_slots

            extras["slots"] = select_slots(p.adapter, adapter, p.trainable, p.extras["budget"])
            adapter = masked_upload(adapter, extras["slots"])
        updates.append(ClientUpdate(s.client_id, adapter, int(rng.integers(1, 50)), extras))
    strategy.aggregate(rnd, updates)


CENTRAL = [n for n in S.names() if S.get_class(n).dp_released]


def _het(name):
    if name == "fedit":
        return [spec(str(i), {"attn": 3, "mlp": 3}, alpha=8.0) for i in range(3)]
    return [spec(str(i), {"attn": 1 + i, "mlp": 2 + i}, alpha=8.0) for i in range(3)]


@pytest.mark.parametrize("name", CENTRAL)
def test_central_dp_without_clipping_or_noise_is_the_strategy_with_uniform_weights(name):
    """The DP hook changes nothing but the weights (fixed 1/K) when no clip binds (HetLoRA's
    data-dependent sparsity weights become uniform: zero-padding's)."""
    specs = _het(name)
    ref = S.get(
        "zero_pad" if name == "hetlora" else name, shapes=SHAPES, seed=3, weighting="uniform"
    )
    dp = attach_central(S.get(name, shapes=SHAPES, seed=3), CentralDP(1e9, 0.0, len(specs), 5))
    for rnd in (1, 2):
        torch.manual_seed(rnd)
        _run_round(ref, specs, np.random.default_rng(rnd), rnd)
        torch.manual_seed(rnd)
        _run_round(dp, specs, np.random.default_rng(rnd), rnd)
    for m, f in ref.global_delta().items():
        want, got = f.delta(), dp.global_delta()[m].delta()
        assert (got - want).norm() <= 1e-6 * want.norm(), (name, m)


BIG = {"attn": (40, 30), "mlp": (48, 36)}


def _state(strategy) -> torch.Tensor:
    """Every aggregated float64 tensor the strategy holds (factors, or the round's delta)."""
    if strategy.name in ("flexlora", "flora"):
        return torch.cat([f.delta().flatten() for _, f in sorted(strategy.global_delta().items())])
    parts = []
    for attr in ("A", "G", "B"):
        for _, t in sorted(getattr(strategy, attr, {}).items()):
            parts.append(t.flatten())
    return torch.cat(parts)


@pytest.mark.parametrize("name", CENTRAL)
def test_central_dp_noise_on_the_aggregate_has_the_mechanism_std(name):
    """The same round with and without noise (same updates): the difference of what the
    strategy holds is the noise, of std noise_multiplier * clip_norm / K per entry."""
    specs = _het(name)
    sigma, clip = 2.0, 0.5
    dp = attach_central(S.get(name, shapes=BIG, seed=3), CentralDP(clip, sigma, len(specs), 9))
    torch.manual_seed(0)
    _run_round(dp, specs, np.random.default_rng(0), 1)
    state = dp.state_dict()
    dp.privacy = CentralDP(clip, 0.0, len(specs), 9)
    torch.manual_seed(1)
    _run_round(dp, specs, np.random.default_rng(1), 2)
    quiet = _state(dp)
    dp.load_state_dict(state)  # the strategy's state, not its DP mechanism: set it again
    dp.privacy = CentralDP(clip, sigma, len(specs), 9)
    torch.manual_seed(1)
    _run_round(dp, specs, np.random.default_rng(1), 2)
    diff = _state(dp) - quiet
    moved = diff[diff != 0]  # lora_a2 noises only the factor trained this round
    assert moved.numel() >= 0.2 * diff.numel()
    assert moved.std().item() == pytest.approx(sigma * clip / len(specs), rel=0.08)


def test_strategies_refuse_central_dp_by_name():
    with pytest.raises(Exception, match="fedex_lora refuses"):
        attach_central(S.get("fedex_lora", shapes=SHAPES), CentralDP(1.0, 1.0, 2))
    with pytest.raises(Exception, match="renormalize"):
        attach_central(S.get("lora_a2", shapes=SHAPES, renormalize=True), CentralDP(1.0, 1.0, 2))


# -- accounting -------------------------------------------------------------------------------


def _analytic_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Exact epsilon of `steps` full-batch Gaussian mechanisms (sensitivity 1, std sigma):
    one Gaussian of std sigma / sqrt(steps) (Balle & Wang, ICML 2018, thm. 8), by bisection."""
    from scipy.stats import norm

    mu = math.sqrt(steps) / sigma

    def delta_of(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_epsilon_matches_the_exact_gaussian_mechanism_and_bounds_it_with_rdp():
    exact = _analytic_gaussian_epsilon(2.0, 10, 1e-5)
    assert epsilon([(2.0, 1.0, 10)], 1e-5, "prv") == pytest.approx(exact, abs=0.02)
    assert exact <= epsilon([(2.0, 1.0, 10)], 1e-5, "rdp") <= 1.3 * exact


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_opacus_stepwise_accounting(accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(30):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    for _ in range(20):
        acc.step(noise_multiplier=0.9, sample_rate=0.1)
    history = [(1.1, 0.05, 10)] * 3 + [(0.9, 0.1, 20)]
    assert epsilon(history, 1e-5, accountant) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


def test_ledgers_accumulate_per_round_and_per_client():
    central = PrivacyLedger("central", 1.2, 0.5, 1e-4, sample_rate=0.1)
    for _ in range(7):
        eps = central.record_central()
    assert eps == pytest.approx(epsilon([(1.2, 0.1, 7)], 1e-4))
    # batch 2 of 8 examples: rate 0.25, 4 steps a round
    local = PrivacyLedger("local", 1.0, 0.5, 1e-3, batch_size=2, steps=4)
    for client in ("a", "b", "a"):
        local.record_local(client, 8)
    eps = local.client_epsilons()
    assert eps["a"] == pytest.approx(epsilon([(1.0, 0.25, 8)], 1e-3))
    assert eps["b"] == pytest.approx(epsilon([(1.0, 0.25, 4)], 1e-3)) and eps["b"] < eps["a"]
    assert local.summary()["epsilon"] == eps["a"]
    restored = PrivacyLedger("local", 9.0, 0.5, 1e-3)
    restored.load_state_dict(local.state_dict())
    assert restored.client_epsilons() == eps and restored.noise_multiplier == 1.0


def test_noise_multiplier_is_solved_from_the_target_epsilon():
    sigma = noise_multiplier_for(4.0, 1e-5, 0.02, 500)
    assert 3.9 <= epsilon([(sigma, 0.02, 500)], 1e-5) <= 4.0
    ledger = plan(
        mode="central", clip_norm=1.0, noise_multiplier=None, target_epsilon=8.0, delta=None,
        accountant="rdp", rounds=20, clients_per_round=5, num_clients=50, client_sizes=[],
        batch_size=4, steps=3, epochs=None,
    )  # fmt: skip
    assert ledger.delta == pytest.approx(1 / 500) and ledger.sample_rate == pytest.approx(0.1)
    assert epsilon([(ledger.noise_multiplier, 0.1, 20)], ledger.delta) <= 8.0


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"privacy.mode": "central"}, "exactly one of privacy.noise_multiplier"),
        (
            {
                "privacy.mode": "local",
                "privacy.noise_multiplier": 1.0,
                "privacy.target_epsilon": 2.0,
            },
            "exactly one",
        ),
        (
            {"privacy.mode": "central", "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 0.0},
            "privacy.clip_norm",
        ),
        (
            {"privacy.mode": "central", "privacy.noise_multiplier": 1.0, "privacy.delta": 1.5},
            "privacy.delta",
        ),
        (
            {
                "privacy.mode": "central",
                "privacy.noise_multiplier": 1.0,
                "strategy.name": "fedex_lora",
                "resources.distribution": "homogeneous",
                "resources.homogeneous_rank": 2,
            },
            "fedex_lora refuses",
        ),
        (
            {
                "privacy.mode": "local",
                "privacy.noise_multiplier": 1.0,
                "strategy.name": "hetlora",
                "strategy.options": {"prune_lambda": 0.1},
            },
            "prune_lambda",
        ),
        (
            {"privacy.mode": "local", "privacy.noise_multiplier": 1.0, "train.grad_accum_steps": 2},
            "train.grad_accum_steps",
        ),
        (
            {"privacy.mode": "local", "privacy.noise_multiplier": 1.0, "train.compile": True},
            "train.compile",
        ),
    ],
)
def test_bad_privacy_configuration_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_preset("tiny", overrides)
