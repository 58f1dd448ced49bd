"""Update-norm defences (`fedlora.core.robust`, `fedlora.core.norms.clip_contribution`) against
float64 numpy references, and per-client fault isolation in the in-process engine: every kind of bad
update, for every strategy, drops its client and the run goes on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import SHAPES, np_delta

import fedlora.strategies as registry
from fedlora.core.contract import ClientUpdate, FedLoraError, LoraFactors, Payload
from fedlora.core.norms import clip_contribution, contribution_norm, scale_adapter
from fedlora.core.robust import (
    NormBound,
    NormHistory,
    WeightBound,
    screen_updates,
    start_of,
)
from fedlora.engine import run_experiment
from fedlora.federation.config import load_preset

# -- the maths, against numpy ------------------------------------------------------------------


def _factors(rng, shape, r, scale, zero_b=False):
    d_out, d_in = shape
    A = torch.tensor(rng.standard_normal((r, d_in)), dtype=torch.float32)
    B = torch.zeros(d_out, r) if zero_b else torch.tensor(rng.standard_normal((d_out, r)))
    return LoraFactors(A, B.float(), scale)


def _np_contribution(adapter, start) -> float:
    sq = 0.0
    for m, f in adapter.items():
        d = np_delta(f) - (np_delta(start[m]) if start.get(m) is not None else 0.0)
        sq += float((d**2).sum())
    return math.sqrt(sq)


@pytest.mark.parametrize("case", ["both_trained", "b_trained", "fresh_start", "pruned_tail"])
def test_clip_contribution_reaches_the_bound(case):
    rng = np.random.default_rng(7)
    start = {m: _factors(rng, s, 4, 2.0, zero_b=case == "fresh_start") for m, s in SHAPES.items()}
    if case == "pruned_tail":  # a small last slot, the one the client prunes
        start = {m: LoraFactors(f.A, torch.cat([f.B[:, :3], 0.01 * f.B[:, 3:]], 1), f.scale)
                 for m, f in start.items()}  # fmt: skip
    after = {}
    for m, f0 in start.items():
        step = _factors(rng, SHAPES[m], 4, 2.0)
        A = f0.A if case == "b_trained" else f0.A + step.A
        after[m] = LoraFactors(A, f0.B + step.B, 2.0)
        if case == "pruned_tail":  # HetLoRA: the client uploads its first 3 slots only
            after[m] = LoraFactors(after[m].A[:3], after[m].B[:, :3], 2.0)
    full = _np_contribution(after, start)
    bound = 0.3 * full
    clipped, norm, t = clip_contribution(after, start, bound)
    assert norm == pytest.approx(full, rel=1e-9)
    assert clipped is not None and 0 < t < 1
    assert _np_contribution(clipped, start) == pytest.approx(bound, rel=1e-4)
    assert _np_contribution(clipped, start) <= bound * (1 + 1e-5)
    for m, f in clipped.items():  # same ranks and scales: the strategy accepts it
        assert f.A.shape == after[m].A.shape and f.scale == after[m].scale
    if case in ("b_trained", "fresh_start"):  # linear: exactly t times the contribution
        for m in after:
            base = np_delta(start[m])
            want = base + t * (np_delta(after[m]) - base)
            np.testing.assert_allclose(np_delta(clipped[m]), want, rtol=1e-5, atol=1e-6)
    if case == "pruned_tail":  # a bound below the dropped tail's own norm cannot be met
        tail = _np_contribution({m: LoraFactors(f.A[:3], f.B[:, :3], f.scale)
                                 for m, f in start.items()}, start)  # fmt: skip
        assert clip_contribution(after, start, 0.5 * tail)[0] is None
    # within the bound already: unchanged
    same, _, t1 = clip_contribution(after, start, 2 * full)
    assert t1 == 1.0 and all(same[m] is after[m] for m in after)


def test_start_of_lora_a2_slots_compares_the_uploaded_slots():
    rng = np.random.default_rng(1)
    sent = {m: _factors(rng, s, 6, 1.5) for m, s in SHAPES.items()}
    slots = {"attn": torch.tensor([1, 4]), "mlp": torch.tensor([0, 2, 5])}
    up = {}
    for m, idx in slots.items():
        f = sent[m]
        B = f.B[:, idx] + torch.tensor(rng.standard_normal((f.B.shape[0], len(idx)))).float()
        up[m] = LoraFactors(f.A[idx], B, 1.5)
    u = ClientUpdate("c", up, 5, {"slots": slots})
    start = start_of(u, Payload(None, sent))
    got = screen_updates([(u, start)], NormBound()).norms["c"]
    # numpy: only the uploaded slots' B moved; the contribution is dB_sel @ A_sel
    want = math.sqrt(
        sum(
            float(
                (
                    (
                        1.5
                        * (up[m].B.double().numpy() - sent[m].B[:, idx].double().numpy())
                        @ sent[m].A[idx].double().numpy()
                    )
                    ** 2
                ).sum()
            )
            for m, idx in slots.items()
        )
    )
    assert got == pytest.approx(want, rel=1e-9)


def _round(rng, n, scaled=None, factor=1e6):
    items = []
    for i in range(n):
        adapter = {m: _factors(rng, s, 2, 1.0) for m, s in SHAPES.items()}
        if i == scaled:
            adapter = scale_adapter(adapter, factor)
        items.append((ClientUpdate(str(i), adapter, 10), {}))
    return items


@pytest.mark.parametrize("n", [2, 5])
def test_relative_bound_rejects_a_giant_update_even_in_a_round_of_two(n):
    items = _round(np.random.default_rng(n), n, scaled=n - 1)
    out = screen_updates(items, NormBound(max_ratio=10.0))
    assert [u.client_id for u in out.kept] == [str(i) for i in range(n - 1)]
    assert list(out.dropped) == [str(n - 1)]
    assert "robust.max_norm_ratio = 10" in out.dropped[str(n - 1)]
    for u, start in items:  # the norms are the numpy ones
        assert out.norms[u.client_id] == pytest.approx(_np_contribution(u.adapter, start), 1e-9)


def test_absolute_bound_and_clip_action():
    items = _round(np.random.default_rng(3), 4)
    norms = [_np_contribution(u.adapter, s) for u, s in items]
    limit = sorted(norms)[1] * 1.0001  # two under, two over
    out = screen_updates(items, NormBound(max_norm=limit, action="clip"))
    assert len(out.kept) == 4 and not out.dropped
    assert sorted(out.clipped) == sorted(str(i) for i, n in enumerate(norms) if n > limit)
    for u in out.kept:
        assert _np_contribution(u.adapter, {}) <= limit * (1 + 1e-5)
    rejected = screen_updates(items, NormBound(max_norm=limit))
    assert len(rejected.kept) == 2 and "robust.max_update_norm" in next(
        iter(rejected.dropped.values())
    )


def test_a_lone_client_is_bounded_by_history_then_by_the_fallback():
    """Issue 18: a round with one usable client has round-mates for no relative bound; it
    falls back to earlier rounds' accepted norms, and before any to ``fallback_norm``."""
    rng = np.random.default_rng(4)
    honest, giant = _round(rng, 1), _round(rng, 1, scaled=0)
    n = _np_contribution(honest[0][0].adapter, {})
    first = NormBound(max_ratio=2.0)  # round 1: nothing to compare with but the fallback 100
    assert n < 100 and len(screen_updates(honest, first).kept) == 1
    out = screen_updates(giant, first)
    assert not out.kept and "robust.fallback_max_norm = 100" in out.dropped["0"]
    history = NormHistory()
    history.end_round(first, [n])
    out = screen_updates(giant, first, history=history)  # later rounds
    assert not out.kept and "largest median accepted norm" in out.dropped["0"]
    assert len(screen_updates(honest, first, history=history).kept) == 1
    # a slightly larger honest update in a later round passes (2 x the reference)
    bigger = [(ClientUpdate("0", scale_adapter(honest[0][0].adapter, 1.5), 10), {})]
    assert len(screen_updates(bigger, first, history=history).kept) == 1
    # no fallback and no history: unbounded, as the relative bound off
    assert len(screen_updates(giant, NormBound(max_ratio=2.0, fallback_norm=None)).kept) == 1
    with pytest.raises(FedLoraError, match="max_ratio"):
        NormBound(max_ratio=-1.0)


@pytest.mark.parametrize("ratio", [2.0, 20.0, 1000.0])
def test_a_lone_client_aiming_just_under_its_bound_cannot_ratchet_it(ratio):
    """Issue 27: alone in every round and submitting 0.999 x the bound each time, a client
    moved the bound x19 a round (99 -> 1,881 -> 35,740 -> 679,000 with ratio 20). Now the lone
    bound grows at most x2 a round and to at most 4 x the first-round value, for 50 rounds."""
    bound, history = NormBound(max_ratio=ratio, fallback_norm=0.5), NormHistory()
    accepted = []
    for _ in range(50):
        limit, _ = history.lone_limit(bound)
        accepted.append(0.999 * limit)
        history.end_round(bound, [accepted[-1]])
    assert accepted[0] == pytest.approx(0.4995)
    assert all(b <= 2 * a * (1 + 1e-9) for a, b in zip(accepted, accepted[1:]))
    assert max(accepted) <= 4 * 0.5, accepted[:5]
    # honest norms far below the cap still follow the ratio x the reference
    honest = NormHistory()
    honest.end_round(bound, [0.01])
    assert honest.lone_limit(bound)[0] == pytest.approx(min(ratio * 0.01, 1.0, 2.0))
    # the growth state is checkpointed
    again = NormHistory()
    again.load_state_dict(history.state_dict())
    assert again.lone_limit(bound) == history.lone_limit(bound)
    with pytest.raises(FedLoraError, match="lone bound"):
        again.load_state_dict({"medians": [1.0], "lone": float("inf")})


def test_norm_history_keeps_a_window_of_round_medians():
    h = NormHistory()
    assert h.reference() is None
    for i in range(1, 15):
        h.record([float(i), 3.0 * i, 2.0 * i])  # median 2i
    assert h.medians == [2.0 * i for i in range(5, 15)] and h.reference() == 28.0
    h.record([])  # a round without accepted updates changes nothing
    assert len(h.medians) == 10
    g = NormHistory()
    g.load_state_dict(h.state_dict())
    assert g.medians == h.medians
    with pytest.raises(FedLoraError, match="norm history"):
        g.load_state_dict({"medians": [float("nan")]})


def test_weight_bound_registered_counts_and_median_cap():
    w = WeightBound(4.0, {"a": 10, "b": 20, "c": 30})
    assert w.bound("a", 8) == (8, None)
    assert w.bound("a", 10**12)[0] == 10  # a registered client: never above its count
    n, why = w.bound("stranger", 10**12)  # unknown: 4 x the median registered count
    assert n == 80 and "robust.max_weight_ratio = 4" in why
    assert not w.needs_round
    free = WeightBound(4.0)  # nothing registered: the round's reported counts
    assert free.needs_round
    assert free.bound("x", 10**12, [16, 16, 16, 10**12])[0] == 64
    assert free.bound("x", 16, [16, 16, 16, 10**12]) == (16, None)
    with pytest.raises(FedLoraError, match="max_ratio"):
        WeightBound(0.5)


# -- the engine: one bad client is a dropped client ------------------------------------------


def _cfg(tmp_path, name, **extra):
    overrides = {
        "output_dir": str(tmp_path / name),
        "rounds": 4,
        "clients_per_round": 3,
        "strategy.name": name,
        "data.num_clients": 5,
        "data.tasks": ["wn_antonym", "rt_sentiment", "fortune_author", "wn_part_of_speech"],
        "data.heldout_tasks": [],
        "data.max_examples_per_client": 8,
        "train.local_steps": 1,
        "train.max_length": 40,
        "eval.every": 100,
        "eval.metrics": ["loss"],
        "eval.max_examples": 4,
        "eval.per_task": False,
        **extra,
    }
    if name in ("fedit", "fedex_lora"):
        overrides.update({"resources.distribution": "homogeneous", "resources.homogeneous_rank": 2})
    return load_preset("tiny", overrides)


def _corrupt(u: ClientUpdate, kind: str) -> ClientUpdate:
    m = sorted(u.adapter)[0]
    f = u.adapter[m]
    adapter = dict(u.adapter)
    n, extras = u.num_examples, dict(u.extras)
    if kind == "nan":
        B = f.B.clone()
        B[0, 0] = math.nan
        adapter[m] = LoraFactors(f.A, B, f.scale)
    elif kind == "shape":
        adapter[m] = LoraFactors(torch.zeros(f.rank, f.A.shape[1] + 1), f.B, f.scale)
    elif kind == "rank":
        adapter[m] = LoraFactors(
            torch.cat([f.A, f.A[:1]]), torch.cat([f.B, f.B[:, :1]], 1), f.scale
        )
    elif kind == "zero_examples":
        n = 0
    elif kind == "loss":
        extras["train_loss"] = math.inf
    elif kind == "scaled":
        adapter = scale_adapter(adapter, 1e6)
    elif kind == "exception":
        raise RuntimeError("client crashed")
    return ClientUpdate(u.client_id, adapter, n, extras)


KINDS = ["nan", "shape", "rank", "zero_examples", "loss", "scaled", "exception"]
REASONS = {
    "nan": "NaN or Inf",
    "shape": "shape",
    "rank": "rank",
    "zero_examples": "num_examples",
    "loss": "train_loss is inf",
    "scaled": "robust.max_norm_ratio",
    "exception": "RuntimeError: client crashed",
}


@pytest.mark.parametrize("name", registry.names())
def test_every_bad_update_kind_drops_only_its_client(tmp_path, name):
    """Rounds 1-3: two of the three clients are bad (7 kinds), round 4 all three are bad."""
    plan: dict[tuple[int, str], str] = {}
    pending = iter(KINDS)

    def inject(rnd, spec, update):
        per_round = plan_round.setdefault(rnd, [])
        if rnd == 4 or len(per_round) < 2:
            kind = next(pending, "nan")
            per_round.append(kind)
            plan[(rnd, spec.client_id)] = kind
            return _corrupt(update, kind)
        return None

    plan_round: dict[int, list[str]] = {}
    result = run_experiment(_cfg(tmp_path, name), progress=False, on_update=inject)
    rows = result.round_rows()
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        bad = {c: k for (rnd, c), k in plan.items() if rnd == r["round"]}
        assert set(r["dropped"]) == set(bad), r["dropped"]
        for c, kind in bad.items():
            assert REASONS[kind] in r["dropped"][c], (kind, r["dropped"][c])
        assert r["used"] == 3 - len(bad)
        assert r["aggregated"] == (r["used"] > 0)
        if r["used"]:
            assert math.isfinite(r["train_loss"])
    assert set(KINDS) <= set(plan.values())
    assert result.summary["rounds_without_update"] == [4]
    assert set(result.summary["dropped"]) == {"1", "2", "3", "4"}
    for f in result.strategy.global_delta().values():
        assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
        assert float(f.delta().abs().max()) < 1e3  # nothing of the 1e6-scaled update got in


def test_round_without_usable_update_leaves_the_model_unchanged(tmp_path):
    seen = {}

    def record(rnd, result):
        seen[rnd] = {m: f.delta() for m, f in result.strategy.global_delta().items()}

    def crash_in_round_3(rnd, spec, update):
        if rnd == 3:
            raise RuntimeError("all down")

    run_experiment(
        _cfg(tmp_path, "flexlora"),
        progress=False,
        on_update=crash_in_round_3,
        on_round_end=record,
    )
    assert seen[3].keys() == seen[2].keys()
    for m in seen[2]:
        assert torch.equal(seen[3][m], seen[2][m])
    assert not torch.equal(seen[4][m], seen[3][m])


def test_clip_action_keeps_a_giant_update_within_the_bound(tmp_path):
    def scale_first(rnd, spec, update):
        return _corrupt(update, "scaled") if spec.client_id == first[rnd] else None

    first: dict[int, str] = {}

    def pick(rnd, spec, update):
        first.setdefault(rnd, spec.client_id)
        return scale_first(rnd, spec, update)

    cfg = _cfg(tmp_path, "flora", **{"robust.action": "clip", "robust.max_norm_ratio": 3.0})
    result = run_experiment(cfg, progress=False, on_update=pick)
    for r in result.round_rows():
        c = first[r["round"]]
        assert c in r["clipped"] and not r["dropped"] and r["used"] == 3
        others = [n for k, n in r["update_norms"].items() if k != c]
        assert 0 < r["clipped"][c] < 1e-4  # it kept a tiny fraction of its 1e6-scaled delta
        assert r["update_norms"][c] > 1e4 * max(others)  # the norm before clipping


def test_nan_loss_from_a_huge_learning_rate_drops_clients_not_the_run(tmp_path):
    cfg = _cfg(tmp_path, "flexlora", **{"train.lr": 1e6, "rounds": 2})
    result = run_experiment(cfg, progress=False)
    reasons = [v for r in result.round_rows() for v in r["dropped"].values()]
    # a diverging client: a non-finite loss in training, or NaN/Inf factors on its way back
    assert reasons and all(("loss became" in v) or ("NaN or Inf" in v) for v in reasons)
    assert [r["round"] for r in result.round_rows()] == [1, 2]
    for f in result.strategy.global_delta().values():
        assert torch.isfinite(f.B).all()


def test_fatal_drops_stop_the_run(tmp_path):
    cfg = _cfg(tmp_path, "flora", **{"robust.fatal_drops": True})
    with pytest.raises(FedLoraError, match="robust.fatal_drops"):
        run_experiment(cfg, progress=False, on_update=lambda r, s, u: _corrupt(u, "nan"))
    with pytest.raises(RuntimeError, match="client crashed"):  # the real error, traceback kept
        run_experiment(
            _cfg(tmp_path / "b", "flora", **{"robust.fatal_drops": True}),
            progress=False,
            on_update=lambda r, s, u: _corrupt(u, "exception"),
        )


def test_a_lone_1e6_client_is_never_accepted(tmp_path):
    """Issue 18: with clients_per_round = 1 a 1e6-scaled client has no round-mates; round 1
    falls back to robust.fallback_max_norm, later rounds to the accepted norms of earlier
    ones. Honest lone clients still pass, and the global model stays small."""
    bad_rounds = {1, 3, 4}

    def on_update(rnd, spec, u):
        if rnd not in bad_rounds:
            return None
        return ClientUpdate(u.client_id, scale_adapter(u.adapter, 1e6), u.num_examples, u.extras)

    cfg = _cfg(tmp_path, "flexlora", rounds=5, clients_per_round=1)
    res = run_experiment(cfg, progress=False, on_update=on_update)
    for r in res.round_rows():
        assert r["aggregated"] == (r["round"] not in bad_rounds), r
        if r["round"] in bad_rounds:
            (why,) = r["dropped"].values()
            bound = "fallback_max_norm" if r["round"] == 1 else "(no round-mates)"
            assert bound in why, why
    for f in res.strategy.global_delta().values():
        assert float(f.B.abs().max()) < 1.0  # 5.9e9 before issue 18


def _global_norm(strategy) -> float:
    return math.sqrt(sum(float(f.delta().norm()) ** 2 for f in strategy.global_delta().values()))


def _current_lone_bound(server) -> float:
    """What the server would accept from a client alone this round (an oracle attacker);
    before issue 27 (no ``lone_limit``): the bound as that code set it."""
    if hasattr(server.history, "lone_limit"):
        return server.history.lone_limit(server.bound)[0]
    return server.bound.limit([], server.history.reference())[0]


def test_an_escalating_lone_client_cannot_ratchet_its_bound(tmp_path, monkeypatch):
    """Issue 27, the in-process engine: one client a round, each round its update scaled to
    just under the server's current bound (an oracle attacker: it reads the server's own lone
    bound). Before: accepted 99 -> 1,881 -> 35,740 -> 679,000, global delta 7.2e5 against 0.3
    honest, then NaN. Now: the first-round bound is 0.25 x the adapted base weights' norm, and
    no accepted norm exceeds 4 x it; the loss stays finite."""
    import fedlora.federation.build as build

    servers = []
    real = build.build_server
    monkeypatch.setattr(
        build, "build_server", lambda *a, **k: servers.append(real(*a, **k)) or servers[-1]
    )

    def attack(rnd, spec, u):
        limit = _current_lone_bound(servers[-1])
        n = contribution_norm(u.adapter, {m: None for m in u.adapter})
        return ClientUpdate(u.client_id, scale_adapter(u.adapter, 0.99 * limit / n), 8, u.extras)

    # FLoRA starts every client from a fresh init: scaling B scales the contribution exactly
    honest = run_experiment(_cfg(tmp_path / "h", "flora", rounds=5, clients_per_round=1),
                            progress=False)  # fmt: skip
    cfg = _cfg(tmp_path / "a", "flora", rounds=5, clients_per_round=1)
    res = run_experiment(cfg, progress=False, on_update=attack)
    first = servers[-1].bound.fallback_norm
    accepted = [n for r in res.round_rows() for n in r["update_norms"].values()]
    assert len(accepted) == 5 and all(r["aggregated"] for r in res.round_rows())
    assert first < 1.0 and accepted[0] == pytest.approx(0.99 * first)
    assert max(accepted) <= 4 * first * 1.0001, accepted
    # x2 a round, then 4 x the first-round value: 0.67, 1.35, 2.69, 2.69, 2.69 on tiny
    assert accepted == pytest.approx([0.99 * first * k for k in (1, 2, 4, 4, 4)], rel=1e-3)
    assert all(math.isfinite(r["train_loss"]) for r in res.round_rows())
    ratio = _global_norm(res.strategy) / _global_norm(honest.strategy)
    assert ratio < 60, ratio  # 2.3e6 before issue 27 (7.2e5 against 0.3), and NaN losses


def test_a_hostile_example_count_weighs_the_registered_count(tmp_path):
    """In the in-process engine every client's count is the server's (its partition size): a
    reported 10**12 weighs that, and the run equals one where it reported honestly."""

    def lie(rnd, spec, u):
        if spec.client_id != "1":
            return None
        return ClientUpdate(u.client_id, u.adapter, 10**12, u.extras)

    honest = run_experiment(_cfg(tmp_path / "a", "fedit"), progress=False)
    lied = run_experiment(_cfg(tmp_path / "b", "fedit"), progress=False, on_update=lie)
    capped = [r["capped_weights"] for r in lied.round_rows() if r["capped_weights"]]
    assert capped and all(c == {"1": [10**12, 8]} for c in capped)
    for a, b in zip(honest.round_rows(), lied.round_rows()):
        assert a["train_loss"] == b["train_loss"]
    for m, f in honest.strategy.global_delta().items():
        assert torch.equal(f.B, lied.strategy.global_delta()[m].B)
