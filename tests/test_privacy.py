"""Differential privacy (`fedlora.core.privacy`): clipping, noise and accounting against independent
references (float64 numpy, the analytic Gaussian mechanism, Opacus's own step API), and the
strategies' central-DP aggregation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers import SHAPES, np_delta, random_update, spec

import fedlora.strategies as S
from fedlora import ClientUpdate, FedLoraError, LoraFactors
from fedlora.core.accounting import Plan, PrivacyLedger, epsilon, noise_multiplier_for, plan
from fedlora.core.privacy import (
    CentralDP,
    attach_central,
    clip_factor_update,
    delta_update_terms,
    release_shape,
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
    for m in SHAPES:  # the clipped change, c (D - T)
        want = c * diffs[m]
        got = sum(w * (G @ A).numpy() for G, A, w in terms[m])
        assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max()
    clipped = math.sqrt(
        sum(float((sum(w * (G @ A).numpy() for G, A, w in terms[m]) ** 2).sum()) for m in SHAPES)
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


def test_noise_has_the_mechanism_std_and_comes_from_the_secret():
    dp = CentralDP(clip_norm=0.5, noise_multiplier=1.3, clients_per_round=4, secret=11)
    x = dp.noise((400, 500), 3, "G/m")
    assert x.std().item() == pytest.approx(1.3 * 0.5 / 4, rel=0.01)
    assert abs(x.mean().item()) < 5 * dp.noise_std / math.sqrt(x.numel())
    assert torch.equal(x, dp.noise((400, 500), 3, "G/m"))  # a resumed server draws the same
    assert not torch.equal(x, dp.noise((400, 500), 4, "G/m"))
    assert not torch.equal(x, dp.noise((400, 500), 3, "A/m"))
    other = CentralDP(clip_norm=0.5, noise_multiplier=1.3, clients_per_round=4, secret=12)
    assert not torch.equal(x, other.noise((400, 500), 3, "G/m"))


def _updates(strategy, specs, rng, rnd, send_start=False, size=0.1):
    """Configure `specs` for round `rnd` and make their updates: each start plus a random
    change of std `size` on the factors it trains (`send_start`: the start unchanged)."""
    from fedlora.core.contract import payload_start

    updates, starts = [], {}
    for s in specs:
        p = strategy.configure(s, rnd)
        start = payload_start(s, p, strategy.shapes, strategy.name)
        starts[s.client_id] = (p, start)
        adapter = {}
        for m, f in start.items():
            A, B = f.A.float(), f.B.float()
            if not send_start:
                A = A + (size * torch.randn_like(A) if "A" in p.trainable else 0)
                B = B + (size * torch.randn_like(B) if "B" in p.trainable else 0)
            adapter[m] = LoraFactors(A, B, f.scale)
        extras = {}
        if "budget" in p.extras:
            from fedlora.strategies.lora_a2 import masked_upload, select_slots

            extras["slots"] = select_slots(p.adapter, adapter, p.trainable, p.extras["budget"])
            adapter = masked_upload(adapter, extras["slots"])
        updates.append(ClientUpdate(s.client_id, adapter, int(rng.integers(1, 50)), extras))
    return updates, starts


def _run_round(strategy, specs, rng, rnd, send_start=False):
    strategy.aggregate(rnd, _updates(strategy, specs, rng, rnd, send_start)[0])


def _central(name, specs, clip, sigma, secret=5, shapes=SHAPES):
    """`name` may carry a variant: "lora_a2:nofreeze" trains both factors every round."""
    name, _, variant = name.partition(":")
    options = {"alternating_freeze": False} if variant == "nofreeze" else {}
    strategy = S.get(name, shapes=shapes, seed=3, **options)
    ranks, scales = release_shape(strategy, specs)
    dp = CentralDP(clip, sigma, len(specs), secret=secret, ranks=ranks, scales=scales)
    return attach_central(strategy, dp)


CENTRAL = [n for n in S.names() if S.get_class(n).dp_released] + ["lora_a2:nofreeze"]


def _het(name):
    if name == "fedit":
        return [spec(str(i), {"attn": 3, "mlp": 3}, alpha=8.0) for i in range(3)]
    return [spec(str(i), {"attn": 1 + i, "mlp": 2 + i}, alpha=8.0) for i in range(3)]


def _released(strategy) -> np.ndarray:
    """The quantity central DP releases, float64, in a fixed order: the global delta per
    module (delta strategies), else the global factors A then G = scale * B per module."""
    if strategy.dp_released == "delta":
        delta = sorted(strategy.global_delta().items())
        return np.concatenate([np_delta(f).ravel() for _, f in delta])
    parts = [t.double().numpy().ravel() for _, t in sorted(strategy.A.items())]
    parts += [t.double().numpy().ravel() for _, t in sorted(strategy.G.items())]
    return np.concatenate(parts)


def _reference_change(strategy, u, start, clip, k) -> np.ndarray:
    """float64 numpy: (1/K) c pad(sent - start) in `_released`'s layout, c = min(1, C/||.||),
    the norm over what the strategy releases (LoRA-A2: the trained factor's uploaded slots, in
    the client's units)."""
    kind, mods = strategy.dp_released, sorted(strategy.shapes)
    if kind == "delta":
        d = {m: np_delta(u.adapter[m]) - np_delta(start[m]) for m in mods}
        norm = math.sqrt(sum(float((x**2).sum()) for x in d.values()))
        c = min(1.0, clip / norm) if norm > 0 else 1.0
        return np.concatenate([c / k * d[m].ravel() for m in mods])
    dA, dG, sq = {}, {}, 0.0
    for m in mods:
        R, d_in = strategy.A[m].shape
        dA[m], dG[m] = np.zeros((R, d_in)), np.zeros((strategy.G[m].shape[0], R))
        if m not in u.adapter:
            continue
        f, s0 = u.adapter[m], start[m]
        idx = list(u.extras["slots"][m]) if "slots" in u.extras else list(range(f.rank))
        a0, b0 = s0.A.double().numpy()[idx], s0.B.double().numpy()[:, idx]
        da, db = f.A.double().numpy() - a0, f.B.double().numpy() - b0
        if kind != "B":
            dA[m][idx] = da
        dG[m][:, idx] = f.scale * db
        # the clipped norm: the factor vector (A, scale B); B only (ffa); LoRA-A2: client units
        sq += float((da**2).sum()) * (kind != "B") + float(
            ((db if kind == "trained" else f.scale * db) ** 2).sum()
        )
    c = min(1.0, clip / math.sqrt(sq)) if sq > 0 else 1.0
    parts = [c / k * dA[m].ravel() for m in mods] + [c / k * dG[m].ravel() for m in mods]
    return np.concatenate(parts)


@pytest.mark.parametrize("send_start", [False, True])
@pytest.mark.parametrize("name", CENTRAL)
def test_central_release_moves_by_at_most_c_over_k_when_one_client_is_removed(name, send_start):
    """Add/remove one client (heterogeneous ranks, clipping binding): the release changes by
    exactly (1/K) c_j pad(change_j) of a float64 reference, whose norm is at most C/K (the
    stated sensitivity; LoRA-A2's B in the client's units, its scale times that in G). A
    client sending back its start moves nothing."""
    specs, clip = _het(name), 0.5
    k = len(specs)
    strategy = _central(name, specs, clip, 0.0)
    torch.manual_seed(0)
    _run_round(strategy, specs, np.random.default_rng(0), 1, send_start)
    with_j, without_j = copy.deepcopy(strategy), copy.deepcopy(strategy)
    torch.manual_seed(1)
    updates, starts = _updates(with_j, specs, np.random.default_rng(1), 2, send_start, size=3.0)
    for s in specs[1:]:  # the same payloads: client "0" is not sampled here
        without_j.configure(s, 2)
    before = _released(with_j)
    with_j.aggregate(2, updates)
    without_j.aggregate(2, updates[1:])
    diff = _released(with_j) - _released(without_j)
    want = _reference_change(strategy, updates[0], starts["0"][1], clip, k)
    # (float32 payloads: a start sent back differs from the float64 global by ~1e-9)
    assert np.abs(diff - want).max() <= 1e-7 * max(1.0, np.abs(want).max()), name
    unit = max(strategy.privacy.scales.values()) if name.startswith("lora_a2") else 1.0
    assert np.linalg.norm(diff) <= unit * clip / k * (1 + 1e-9)
    if send_start:
        assert np.abs(diff).max() <= 1e-7
    else:  # the clip binds, and the release moved from the previous global
        assert np.linalg.norm(diff) >= 0.5 * clip / k
        assert np.abs(_released(without_j) - before).max() > 0


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
    dp = _central(name, specs, clip, sigma, 9, BIG)
    torch.manual_seed(0)
    _run_round(dp, specs, np.random.default_rng(0), 1)
    state = dp.state_dict()
    mechanism = dp.privacy
    dp.privacy = copy.deepcopy(mechanism)
    dp.privacy.noise_multiplier = 0.0
    torch.manual_seed(1)
    _run_round(dp, specs, np.random.default_rng(1), 2)
    quiet = _state(dp)
    dp.load_state_dict(state)  # the strategy's state, not its DP mechanism: set it again
    dp.privacy = mechanism
    torch.manual_seed(1)
    _run_round(dp, specs, np.random.default_rng(1), 2)
    diff = _state(dp) - quiet
    moved = diff[diff != 0]  # lora_a2 noises only the factor trained this round
    assert moved.numel() >= 0.2 * diff.numel()
    # (lora_a2 trains A in round 2: its noise is in A's own units)
    assert moved.std().item() == pytest.approx(sigma * clip / len(specs), rel=0.08)


@pytest.mark.parametrize("name", CENTRAL)
def test_a_central_round_without_updates_still_releases_noise(name):
    """Poisson sampling may draw nobody: the round releases the previous global plus noise
    (the accountant counts it), and an empty round without noise changes nothing."""
    specs = _het(name)
    dp = _central(name, specs, 0.5, 2.0, 9, BIG)
    _run_round(dp, specs, np.random.default_rng(0), 1)
    before = _released(dp)
    dp.begin_round(2)
    dp.aggregate(2, [])
    moved = _released(dp) - before
    moved = moved[moved != 0]
    assert moved.size > 0.2 * before.size
    assert moved.std() == pytest.approx(2.0 * 0.5 / 3, rel=0.1)


def test_strategies_refuse_central_dp_by_name():
    with pytest.raises(Exception, match="fedex_lora refuses"):
        attach_central(S.get("fedex_lora", shapes=SHAPES), CentralDP(1.0, 1.0, 2))
    with pytest.raises(Exception, match="renormalize"):
        attach_central(S.get("lora_a2", shapes=SHAPES, renormalize=True), CentralDP(1.0, 1.0, 2))
    # a strategy built in code meets the configuration's rules: HetLoRA's data-dependent
    # self-pruning is refused here too, not only in a config file
    with pytest.raises(FedLoraError, match="strategy.options.prune_lambda"):
        attach_central(S.get("hetlora", prune_lambda=0.1), CentralDP(1.0, 1.0, 2))
    for name in S.names():  # every option is held under its own name: none escapes the rules
        strategy = S.get(name, shapes=SHAPES) if name in ("ffa_lora", "lora_a2") else S.get(name)
        assert set(strategy.held_options()) == strategy.option_names() - strategy.engine_options
    for name in ("fedit", "hetlora", "lora_a2"):  # their defaults are accepted
        strategy = S.get(name, shapes=SHAPES) if name == "lora_a2" else S.get(name)
        assert attach_central(strategy, CentralDP(1.0, 1.0, 2)).privacy is not None


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
        Plan(
            mode="central", clip_norm=1.0, noise_multiplier=None, target_epsilon=8.0,
            delta=None, accountant="rdp", rounds=20, clients_per_round=5, num_clients=50,
            client_sizes=[], batch_size=4, steps=3, epochs=None,
        )
    )  # fmt: skip
    assert ledger.delta == pytest.approx(1 / 500) and ledger.sample_rate == pytest.approx(0.1)
    assert 0.99 * 8.0 <= epsilon([(ledger.noise_multiplier, 0.1, 20)], ledger.delta) <= 8.0


#: (sigma, q, T, delta): the issue's four settings
SETTINGS = [(1.0, 0.5, 5, 1 / 60), (0.679, 0.5, 5, 1 / 60), (1.0, 0.01, 1000, 1e-5),
            (0.8, 0.1, 200, 1e-3)]  # fmt: skip


@pytest.mark.parametrize("sigma, q, steps, delta", SETTINGS)
def test_fixed_size_sampling_is_accounted_under_replace_one_as_dp_accounting_does(
    sigma, q, steps, delta
):
    """Exactly K of N clients: dp_accounting's RDP accountant for sampling without
    replacement, replace-one neighbours (sensitivity 2C: multiplier sigma / 2); Poisson
    sampling's add/remove epsilon is smaller (a weaker relation)."""
    import dp_accounting

    n = 60 if q >= 0.1 else 1000
    acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        n, round(q * n), dp_accounting.GaussianDpEvent(sigma / 2)
    )
    acc.compose(event, steps)
    fixed = epsilon([(sigma, q, steps)], delta, "rdp", "replace_one")
    assert fixed == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    poisson = epsilon([(sigma, q, steps)], delta, "rdp", "add_remove")
    assert 0 < poisson < fixed


def test_bad_privacy_parameters_are_refused_not_accounted():
    base = dict(
        mode="central", clip_norm=1.0, noise_multiplier=1.0, target_epsilon=None, delta=None,
        accountant="rdp", rounds=5, clients_per_round=2, num_clients=6, client_sizes=[],
        batch_size=4, steps=3, epochs=None,
    )  # fmt: skip
    with pytest.raises(Exception, match=r"privacy.delta = 0.5: must be below 1/n"):
        plan(Plan(**{**base, "delta": 0.5}))
    with pytest.raises(Exception, match="noise_multiplier = 0.0: must be > 0"):
        plan(Plan(**{**base, "noise_multiplier": 0.0}))
    with pytest.raises(Exception, match="use privacy.accountant = 'rdp'"):
        epsilon([(1.0, 0.1, 10_000)], 1e-5, "prv")
    ledger = plan(Plan(**base))
    assert ledger.epsilon() == 0.0 and ledger.record_central() > 0
    assert ledger.secret != plan(Plan(**base)).secret  # drawn from the OS, never the seed
    seeded = Plan(**{**base, "insecure_seeded_noise": True})
    assert plan(seeded).secret == plan(seeded).secret and not plan(seeded).summary()["private"]


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
            {
                "privacy.mode": "central",
                "privacy.noise_multiplier": 1.0,
                "strategy.name": "hetlora",
                "strategy.options": {"prune_lambda": 0.1},
            },
            "prune_lambda",
        ),
        ({"privacy.mode": "central", "privacy.noise_multiplier": 0.0}, "must be > 0 in a DP"),
        (
            {
                "privacy.mode": "central",
                "privacy.noise_multiplier": 1.0,
                "privacy.sampling": "fixed",
                "privacy.accountant": "prv",
            },
            "Poisson sampling only",
        ),
        (
            {"privacy.mode": "central", "privacy.noise_multiplier": 1.0, "model.name": "tiny-bert",
             "model.kind": "classifier"},
            "classifier head",
        ),
        (
            {"privacy.mode": "local", "privacy.noise_multiplier": 1.0, "strategy.name": "lora_a2"},
            "masked_training",
        ),
        (
            {"privacy.mode": "local", "privacy.noise_multiplier": 1.0, "privacy.clip_norm":
             "adaptive"},
            "only with privacy.mode = 'central'",
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
