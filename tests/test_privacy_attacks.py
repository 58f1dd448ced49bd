"""Issue 26: the attacks on differential privacy, each written so that it succeeds against the
unprotected code (the previous pass) and fails now: noise from a 32-bit seed, uploads that slip
past the central clip, an uncentered adaptive count, a server weakening a local-DP client, and
shared files carrying what the epsilon does not cover."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from flower_grid import task_identity  # noqa: F401 (autouse fixture: the Flower runs)
from test_privacy import CENTRAL, _central, _het, _released, _run_round, _updates

from fedlora import ClientUpdate, LoraFactors
from fedlora.core.accounting import PrivacyLedger
from fedlora.core.contract import FedLoraError, check_update
from fedlora.core.privacy import AdaptiveClip, CentralDP
from fedlora.engine import run_experiment
from fedlora.federation.config import ConfigError, load_preset

# -- the noise cannot be regenerated from a small seed ----------------------------------------


def test_a_birthday_search_finds_no_two_central_noise_streams_alike():
    """Torch's CPU generator keeps 32 bits of its seed: among 2^18 noise streams (rounds) a
    32-bit seed space repeats one about 8 times (n^2 / 2^33), each a stream an attacker could
    find by a 2^32 search and subtract. Keyed by the whole 128-bit secret, none repeats."""
    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, clients_per_round=1, secret=2**127 + 5)
    firsts = [float(dp.noise((1,), rnd, "G/m")[0]) for rnd in range(1 << 18)]
    assert len(set(firsts)) == len(firsts)


def test_secrets_that_differ_only_in_high_bits_give_different_noise():
    from fedlora.core.privacy import secret_normal, secret_uniform

    base = 0x5A5A5A5A_12345678_9ABCDEF0_0FEDCBA9
    streams = {
        bit: secret_normal(base ^ (1 << bit), (64,), "dp-noise", 1, "G/m")
        for bit in (0, 31, 32, 63, 64, 96, 127)
    }
    ref = secret_normal(base, (64,), "dp-noise", 1, "G/m")
    assert torch.equal(ref, secret_normal(base, (64,), "dp-noise", 1, "G/m"))  # resumable
    for bit, z in streams.items():
        assert not torch.equal(z, ref), bit
    # a wider secret's every bit counts too, and the uniforms are in (0, 1)
    assert not np.array_equal(secret_uniform(1 << 200, 8, "x"), secret_uniform(0, 8, "x"))
    u = secret_uniform(base, 100_000, "u")
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005


def test_keyed_normal_noise_is_standard_normal():
    from fedlora.core.privacy import secret_normal

    z = secret_normal(7, (300, 400), "n").numpy()
    assert abs(z.mean()) < 0.01 and z.std() == pytest.approx(1.0, rel=0.01)
    # tails of a standard normal: P(|z| > 2) = 0.0455, P(|z| > 3) = 0.0027
    assert (np.abs(z) > 2).mean() == pytest.approx(0.0455, rel=0.05)
    assert (np.abs(z) > 3).mean() == pytest.approx(0.0027, rel=0.15)


# -- a clip no upload slips past -------------------------------------------------------------


def _attack(u: ClientUpdate, kind: str) -> ClientUpdate:
    """The hostile upload: on the first module of rank >= 2, A rows [1e12, 0] and [1e12, w]
    with B columns g and -g (the Gram norm cancels), or the scale 1e200, or the scale 1e300
    with B = 1e10 (overflow), or extreme but in-range scales and factors."""
    adapter = dict(u.adapter)
    m = next(m for m, f in sorted(adapter.items()) if f.rank >= 2)
    f = adapter[m]
    A, B, scale = f.A.clone(), f.B.clone(), f.scale
    if kind == "gram":
        g = torch.linspace(30.0, 300.0, B.shape[0])
        A[0], A[1] = 0.0, 0.0
        A[0, 0], A[1, 0], A[1, 1] = 1e12, 1e12, 1.0
        B[:, 0], B[:, 1] = g / scale, -g / scale
    elif kind == "scale1e200":
        scale = 1e200
    elif kind == "scale1e300":
        scale, B = 1e300, torch.full_like(B, 1e10)
    elif kind == "tiny_scale":  # scale 1e-30 with B 1e30: G = scale B is ordinary
        scale, B = 1e-30, torch.full_like(B, 1e30)
    else:  # the largest float32 factors at the configured scale
        A, B = torch.full_like(A, 3e38), torch.full_like(B, 3e38)
    adapter[m] = LoraFactors(A, B, scale)
    return ClientUpdate(u.client_id, adapter, u.num_examples, u.extras)


def _checked(strategy, rnd, specs, starts, updates) -> list[ClientUpdate]:
    """What the engines aggregate: the updates that pass `check_update` (a failure drops)."""
    kept = []
    for s, u in zip(specs, updates):
        try:
            check_update(strategy, rnd, s, starts[s.client_id][0], u)
        except FedLoraError:
            continue
        kept.append(u)
    return kept


@pytest.mark.parametrize("kind", ["gram", "scale1e200", "scale1e300", "tiny_scale", "max_f32"])
@pytest.mark.parametrize("name", CENTRAL)
def test_no_upload_moves_the_central_release_by_more_than_c_over_k(name, kind):
    """Against the unprotected path FlexLoRA and FLoRA's Gram norm is ~0 (or NaN) for these
    uploads: the release moved by thousands of C/K, or became NaN. Now every strategy with
    central DP moves by at most C/K (float64 numpy, LoRA-A2's B in the client's units) and the
    release is finite."""
    specs, clip = _het(name), 0.5
    k = len(specs)
    strategy = _central(name, specs, clip, 0.0)
    torch.manual_seed(0)
    _run_round(strategy, specs, np.random.default_rng(0), 1)
    with_j, without_j = copy.deepcopy(strategy), copy.deepcopy(strategy)
    torch.manual_seed(1)
    updates, starts = _updates(with_j, specs, np.random.default_rng(1), 2, size=0.1)
    updates[0] = _attack(updates[0], kind)
    for s in specs[1:]:
        without_j.configure(s, 2)
    with_j.aggregate(2, _checked(with_j, 2, specs, starts, updates))
    without_j.aggregate(2, updates[1:])
    released = _released(with_j)
    assert np.isfinite(released).all()
    diff = released - _released(without_j)
    unit = max(strategy.privacy.scales.values()) if name == "lora_a2" else 1.0
    assert np.linalg.norm(diff) <= unit * clip / k * (1 + 1e-6), name


def test_the_contribution_norm_bounds_the_float64_reference_on_fresh_inputs():
    from fedlora.core.privacy import delta_change_norm

    rng = np.random.default_rng(26)
    for trial in range(20):
        d_out, d_in = rng.integers(3, 40, 2)
        terms = []
        for _ in range(rng.integers(1, 4)):
            r = int(rng.integers(1, 6))
            terms.append((rng.normal(size=(d_out, r)), rng.normal(size=(r, d_in))))
        want = np.linalg.norm(sum(g @ h for g, h in terms))
        got = delta_change_norm([(torch.tensor(g), torch.tensor(h)) for g, h in terms])
        assert want <= got <= want * (1 + 1e-9) + 1e-9, trial
    # the cancelling upload: the true norm is w ||g||; the Gram form gave ~0
    g = np.linspace(30.0, 300.0, 16)
    G = torch.tensor(np.stack([g, -g], 1))
    H = torch.tensor([[1e12, 0.0], [1e12, 1.0]])
    assert delta_change_norm([(G, H)]) >= np.linalg.norm(g) * (1 - 1e-9)


def test_an_unaccountable_norm_is_refused_not_clipped_by_one():
    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, clients_per_round=2)
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(FedLoraError, match="cannot be clipped"):
            dp.clip(bad)


# -- adaptive clipping as published ----------------------------------------------------------


def _noised_count_times_k(norms, removed: bool, k=4, secret=99) -> float:
    """b K from the clip norm's move ``C exp(-lr (b - quantile))`` (the public API), with one
    client's norm removed or not: the same secret and round, so the same count noise."""
    dp = CentralDP(1.0, 1.0, k, secret=secret, adaptive=AdaptiveClip(0.5, 0.2, 1.0))
    for n in norms[1:] if removed else norms:
        dp.clip(n)
    dp.end_round(3)
    return (0.5 - math.log(dp.clip_norm / 1.0) / 0.2) * k


@pytest.mark.parametrize("bit", [1, 0])
def test_removing_one_client_moves_the_noised_count_by_at_most_a_half(bit):
    """Andrew et al. center each bit (subtract 1/2): unprotected, removing a client whose
    norm is under C moved the count by 1, so the count's multiplier was sigma_b, not 2 sigma_b,
    and the pair cost more than the epsilon reported."""
    norms = [0.5 if bit else 2.0, 0.3, 1.5, 0.7]
    moved = abs(_noised_count_times_k(norms, False) - _noised_count_times_k(norms, True))
    assert moved <= 0.5 + 1e-9


def test_adaptive_epsilon_equals_an_independent_computation_at_the_combined_multiplier():
    """z = 1, q = 0.5, 5 rounds, sigma_b = z: the update's noise (measured from the mechanism)
    and the count's (its sensitivity measured by removing a client) compose to one Gaussian
    of multiplier (z_update^-2 + (sigma_b / sensitivity)^-2)^-1/2 (Andrew et al. 2021, Thm 1);
    dp_accounting's RDP epsilon of it equals the ledger's (unprotected: 6.62 spent, 4.15
    reported)."""
    import dp_accounting

    z, q, rounds, clip, k = 1.0, 0.5, 5, 1.0, 4
    dp = CentralDP(clip, z, k, adaptive=AdaptiveClip(0.5, 0.2, z))
    z_update = dp.noise_std * k / clip
    sens = max(
        abs(_noised_count_times_k(n, False) - _noised_count_times_k(n, True))
        for n in ([0.5, 0.3, 1.5, 0.7], [2.0, 0.3, 1.5, 0.7])
    )
    combined = (z_update**-2 + (z / sens) ** -2) ** -0.5
    acc = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(combined))
    acc.compose(event, rounds)
    ledger = PrivacyLedger("central", z, clip, 1e-5, sample_rate=q)
    for _ in range(rounds):
        ledger.record_central()
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(1e-5), abs=0.01)
    assert combined == pytest.approx(z, rel=1e-9)


# -- a local-DP client's protection is its own -----------------------------------------------


def _tiny(tmp_path, **extra):
    return load_preset(
        "tiny",
        {
            "output_dir": str(tmp_path),
            "rounds": 1,
            "privacy.clip_norm": 0.5,
            "privacy.noise_multiplier": 1.0,
            "eval.metrics": ["loss"],
            "eval.max_examples": 4,
            **extra,
        },
    )


def test_a_local_dp_client_refuses_a_payload_asking_for_masked_training(tmp_path, monkeypatch):
    """A hostile server sets ``masked_training`` in LoRA-A2's payload (config validation
    refuses it, the payload is the server's to write): unprotected, the client obeyed, and the
    slots it picked revealed an example. Now it refuses, with a one-line reason in the row."""
    from fedlora.strategies.lora_a2 import LoRAA2

    honest = LoRAA2.configure

    def hostile(self, client, server_round):
        p = honest(self, client, server_round)
        p.extras["masked_training"] = True
        return p

    monkeypatch.setattr(LoRAA2, "configure", hostile)
    cfg = _tiny(
        tmp_path,
        **{
            "strategy.name": "lora_a2",
            "privacy.mode": "local",
            # Poisson sampling from the OS-drawn secret draws nobody with probability 1/64
            # (6 clients, rate 1/2), and a round without clients refuses nothing
            "privacy.sampling": "fixed",
            "strategy.options": {"masked_training": False},
        },
    )
    (row,) = run_experiment(cfg, progress=False, save_final=False).round_rows()
    assert row["dropped"] and row["used"] == 0
    for reason in row["dropped"].values():
        assert "refuses masked_training" in reason and "\n" not in reason


def test_a_flower_node_refuses_run_config_settings_that_weaken_its_local_dp():
    from fedlora.core.privacy import LocalDP, node_local_dp

    run = LocalDP(0.5, 1.0)
    assert node_local_dp(run, {}) is run
    assert node_local_dp(None, {}) is None
    refusals = [
        (LocalDP(0.5, 1.0, seeded=True), {}, "insecure_seeded_noise"),
        (run, {"dp-noise-multiplier": 2.0}, "dp-noise-multiplier = 2"),
        (run, {"dp-clip-norm": 0.1}, "dp-clip-norm = 0.1"),
        (None, {"dp-noise-multiplier": 1.0}, "privacy.mode is not 'local'"),
    ]
    for given, node, match in refusals:
        with pytest.raises(FedLoraError, match=match):
            node_local_dp(given, node)
    seeded = LocalDP(0.5, 1.0, seeded=True)
    assert node_local_dp(seeded, {"dp-allow-seeded-noise": True}) is seeded


def test_a_flower_run_config_with_seeded_noise_is_refused_by_the_nodes(tmp_path):
    """Unprotected, ``privacy.insecure_seeded_noise = true`` in the run config reached the
    nodes and made their uploads replayable; now each node refuses and the round row says
    why, in one line."""
    import test_flower_engine_equivalence as eq
    from flwr.app import Context, Message, RecordDict

    from fedlora.flower import client_app, server_app

    class Grid(eq.ClientAppGrid):  # passes a node's error reply on, as Flower does
        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for msg in messages:
                node = msg.metadata.dst_node_id
                ctx = Context(1, node, dict(self.node_configs[node]), RecordDict(), rc)
                inbound = Message(eq.wire(msg.content), dst_node_id=node, message_type="train")
                if msg.metadata.message_type != "train":
                    replies += super().send_and_receive([msg])
                    continue
                out = client_app.train(inbound, ctx)
                assert out.has_error()
                replies.append(Message(out.error, reply_to=msg))
            return replies

    extra = "privacy.mode=local privacy.clip_norm=0.5 privacy.noise_multiplier=1.0"
    rc = {
        "experiment": "tiny",
        "overrides": f"{eq._overrides('flexlora')} {extra} privacy.insecure_seeded_noise=true",
        "result-dir": str(tmp_path),
        "round-timeout": 10,
    }
    nodes = {100 + i: {"partition-id": i, "num-partitions": 4} for i in range(4)}
    server_app.main(Grid(nodes, rc), Context(1, 0, {}, RecordDict(), rc))
    result = json.loads((tmp_path / "result.json").read_text())
    for r in result["rounds"]:
        assert r["used"] == 0 and len(r["dropped"]) == 4
        for why in r["dropped"].values():
            assert "insecure_seeded_noise" in why and "\n" not in why, why


# -- shared outputs carry only what the epsilon covers ---------------------------------------

PER_CLIENT = ("update_norms", "capped_weights", "client_metrics", "first_loss", "train_seconds")


def _no_private_values(text: str, secret: int | None) -> None:
    if secret is not None:
        assert format(secret, "x") not in text and str(secret) not in text
    for key in PER_CLIENT:
        assert f'"{key}"' not in text, key
    for line in text.splitlines():
        if '"train_loss"' in line:
            assert '"train_loss": null' in line or '"train_loss":null' in line, line


def test_a_central_dp_runs_shared_files_hold_no_secret_and_no_per_client_values(tmp_path):
    from fedlora.federation.checkpoint import load_checkpoint

    cfg = _tiny(tmp_path, **{"strategy.name": "flexlora", "privacy.mode": "central"})
    r = run_experiment(cfg, progress=False, save_final=False)
    secret = int(load_checkpoint(r.run_dir)["privacy"]["secret"], 16)
    assert secret.bit_length() > 64
    rows = (r.run_dir / "metrics.jsonl").read_text().splitlines()
    _no_private_values("\n".join(json.dumps(json.loads(x)) for x in rows if x.strip()), secret)
    _no_private_values(json.dumps(json.loads((r.run_dir / "summary.json").read_text())), secret)


def test_a_central_dp_flower_result_holds_no_secret_and_no_per_client_values(tmp_path):
    from test_flower_engine_equivalence import _flower

    extra = "privacy.mode=central privacy.clip_norm=0.5 privacy.noise_multiplier=1.0"
    result, _, _ = _flower("flexlora", tmp_path, extra)
    text = json.dumps(result)
    assert "secret" not in result["privacy_ledger"] and result["privacy_ledger"]["history"]
    _no_private_values(text, None)
    assert '"clipped"' not in text
    for r in result["rounds"]:
        assert set(r["metrics"]) <= {"epsilon"} | {k for k in r["metrics"] if "-" in k}


def test_per_client_tracking_is_refused_under_a_privacy_mode(tmp_path):
    with pytest.raises(ConfigError, match="tracking.per_client"):
        _tiny(tmp_path, **{"privacy.mode": "central", "tracking.per_client": True})


def test_a_local_dp_flower_node_sends_no_timing_and_no_raw_loss(tmp_path):
    """Unprotected, a local-DP node sent ``train_seconds`` (and its handler's wall time), which
    told a 104-token example from a 512-token one with accuracy 0.90."""
    import test_flower_engine_equivalence as eq

    from fedlora.flower import codec

    replies = []

    class Grid(eq.ClientAppGrid):  # keeps the nodes' train replies
        def send_and_receive(self, messages, *, timeout=None):
            out = super().send_and_receive(messages, timeout=timeout)
            replies.extend(r for r, m in zip(out, messages) if m.metadata.message_type == "train")
            return out

    extra = "privacy.mode=local privacy.clip_norm=0.5 privacy.noise_multiplier=1.0"
    rc = {
        "experiment": "tiny",
        "overrides": f"{eq._overrides('flexlora')} {extra} rounds=1",
        "result-dir": str(tmp_path),
        "round-timeout": 10,
    }
    nodes = {100 + i: {"partition-id": i, "num-partitions": 4} for i in range(4)}
    eq.server_app.main(Grid(nodes, rc), eq.Context(1, 0, {}, eq.RecordDict(), rc))
    assert len(replies) == 4
    for r in replies:
        extras = codec.decode_update(r.content).extras
        assert not {"train_seconds", "train_loss", "first_loss", "last_loss"} & set(extras)
        assert "handler-seconds" not in r.content.metric_records[codec.NODE_METRICS]


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_client_sampling_is_keyed_by_the_whole_secret(sampling):
    """Who is sampled under a privacy mode: from the secret (every bit of it), reproducible
    from the checkpointed sampler state, at the planned rate (Poisson) or exactly K (fixed)."""
    from fedlora.federation import rounds

    def draws(secret, n_rounds=200):
        ledger = PrivacyLedger("central", 1.0, 1.0, 1e-5, secret=secret)
        server = rounds.Server(strategy=None, ledger=ledger, sampling=sampling)
        sampler = rounds.make_sampler(0, ledger)
        out = []
        for _ in range(n_rounds):
            out.append(rounds.draw(server, sampler, list(range(40)), 10, rounds.RoundTally()))
        return out

    base = (0xA5 << 120) | 12345
    ref = draws(base)
    assert draws(base) == ref  # a resumed run draws what an uninterrupted one would
    assert draws(base ^ (1 << 127)) != ref and draws(base ^ (1 << 64)) != ref
    sizes = [len(d) for d in ref]
    if sampling == "fixed":
        assert set(sizes) == {10} and all(d == sorted(set(d)) for d in ref)
    else:
        assert np.mean(sizes) == pytest.approx(10, rel=0.05) and len(set(sizes)) > 3
    counts = np.bincount([c for d in ref for c in d], minlength=40)
    assert counts.min() > 20 and counts.max() < 80  # every client about 50 times of 200
