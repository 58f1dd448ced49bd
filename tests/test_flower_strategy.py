"""FlowerStrategy over a fake in-process Grid: equivalence with a plain loop, node identity,
faults (error replies, NaN, wrong shapes, timeouts, bad declarations, a SuperLink error reply
for a node that went offline).

The nodes run the real ClientApp handlers on the ``tiny`` experiment (tiny random Llama, the
engine's `train_client`): there is one client implementation. The reference loop trains the
same clients with the same backend, outside Flower.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from flower_grid import task_identity, wire  # noqa: E402, F401 (autouse fixture)
from flwr.app import ArrayRecord, ConfigRecord, Error, Message  # noqa: E402

import fedlora.strategies as S  # noqa: E402
from fedlora.core.contract import ClientSpec, FedLoraError  # noqa: E402
from fedlora.core.norms import adapter_norm, scale_adapter  # noqa: E402
from fedlora.core.robust import NormBound  # noqa: E402
from fedlora.flower import client_app, codec  # noqa: E402
from fedlora.flower.backend import get_backend  # noqa: E402
from fedlora.flower.nodes import resolve_spec  # noqa: E402
from fedlora.flower.server_app import build  # noqa: E402
from fedlora.flower.strategy import FlowerStrategy  # noqa: E402

# the tiny preset (6 clients), 1 local step: the engine's client on a tiny random Llama
RUN = {"experiment": "tiny", "overrides": "train.local_steps=1 eval.metrics=loss"}
SHAPES = get_backend(RUN).shapes()  # 14 modules; the smallest is 16 x 32 (k_proj, v_proj)
RANKS = [2, 4, 6, 8]  # 4 clients with different ranks


def _train(spec, payload, partition, server_round):
    """The node-side training every test compares against (outside Flower)."""
    return get_backend(RUN).train(spec, payload, partition, server_round=server_round)






class FakeGrid:
    """A Grid that delivers messages to in-process nodes running fedlora's ClientApp handlers.

    ``faults[node_id]`` maps a message type to "error", "timeout", "nan", "shape", "client" or
    "scaled" (every B times 1e6), or "offline" (the error reply a SuperLink writes for a node
    that stopped sending heartbeats: its source is the SuperLink, node 1). Sent messages get
    message ids, as a real Grid gives them.
    """

    def __init__(self, node_configs, run_config=RUN, faults=None):
        self.node_configs = dict(node_configs)
        self.run_config = run_config
        self.faults = faults or {}
        self.sent = []

    def get_node_ids(self):
        return list(self.node_configs)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            node = msg.metadata.dst_node_id
            kind = msg.metadata.message_type
            self.sent.append((node, kind))
            fault = self.faults.get(node, {}).get(kind.split(".")[0])
            if fault == "timeout":
                continue
            if fault == "offline":
                reply = Message(Error(code=5, reason="Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1  # SUPERLINK_NODE_ID
                replies.append(reply)
                continue
            if fault == "error":
                replies.append(Message(Error(code=0, reason="client crashed"), reply_to=msg))
                continue
            cfg, content = self.node_configs[node], wire(msg.content)
            if kind == "query.hello":
                out = client_app.hello_content(cfg)
            elif kind == "train":
                out = client_app.train_content(content, cfg, self.run_config)
                if callable(fault):  # a test's own hostile node
                    out = fault(out)
                elif fault in ("nan", "shape", "client", "scaled") or fault in HOSTILE:
                    out = _corrupt(out, fault)
            else:
                out = client_app.evaluate_content(content, cfg, self.run_config)
            replies.append(Message(wire(out), reply_to=msg))
        return replies


def _hostile(content, how):
    """Issue 18: replies a node fully controls (weights, dtypes, scales, the meta JSON)."""
    if how == "list-meta":
        content[codec.META] = ConfigRecord({"json": "[1, 2, 3]"})
        return content
    u = codec.decode_update(content)
    if how.startswith("weight"):  # a huge example count and B x 15 (x -15: sign-flipped)
        u.num_examples = 10**12
        u.adapter = {m: type(f)(f.A, f.B * (-15 if how == "weight-flip" else 15), f.scale)
                     for m, f in u.adapter.items()}  # fmt: skip
    elif how == "x15":  # only B x 15: what the weight bound leaves of "weight"
        u.adapter = {m: type(f)(f.A, f.B * 15, f.scale) for m, f in u.adapter.items()}
    elif how == "negated-scale":
        u.adapter = {m: type(f)(f.A, f.B, -f.scale) for m, f in u.adapter.items()}
    elif how in ("int64", "float16"):
        dt = getattr(torch, how)
        u.adapter = {m: type(f)(f.A.to(dt), f.B.to(dt), f.scale) for m, f in u.adapter.items()}
    elif how == "bool-count":
        u.num_examples = True
    return codec.encode_update(u)


HOSTILE = ("list-meta", "weight", "weight-flip", "x15", "negated-scale", "int64", "float16",
           "bool-count")  # fmt: skip


def _corrupt(content, how):
    if how in HOSTILE:
        return _hostile(content, how)
    u = codec.decode_update(content)
    m = next(iter(u.adapter))
    f = u.adapter[m]
    if how == "nan":
        B = f.B.clone()
        B[0, 0] = float("nan")
        u.adapter[m] = type(f)(f.A, B, f.scale)
    elif how == "scaled":
        u.adapter = scale_adapter(u.adapter, 1e6)
    elif how == "shape":
        u.adapter[m] = type(f)(torch.zeros(f.rank, f.A.shape[1] + 1), f.B, f.scale)
    else:
        u.client_id = "someone-else"
    return codec.encode_update(u)


def _nodes(ranks=RANKS):
    return {100 + i: {"partition-id": i, "rank": r} for i, r in enumerate(ranks)}


def _strategy(name):
    options = {"shapes": SHAPES, "seed": 3}
    if name == "lora_a2":
        options["global_rank"] = 6
    if name == "hetlora":
        options["prune_lambda"] = 0.05
        options["gamma"] = 0.75
    if name in ("fedit", "fedex_lora"):  # homogeneous ranks
        return S.get(name, **options), [4, 4, 4, 4]
    return S.get(name, **options), RANKS


def _reference(name, rounds=2):
    """The plain in-process loop: configure, train, aggregate."""
    strategy, ranks = _strategy(name)
    specs = [ClientSpec(f"partition-{i}", {m: r for m in SHAPES}) for i, r in enumerate(ranks)]
    for rnd in range(1, rounds + 1):
        updates = [_train(s, strategy.configure(s, rnd), i, rnd) for i, s in enumerate(specs)]
        strategy.aggregate(rnd, updates)
    return strategy.global_delta()


def _assert_same(got, want, rtol=1e-5):
    assert set(got) == set(want)
    for m in want:
        a, b = got[m].delta(), want[m].delta()
        assert torch.linalg.norm(a - b) <= rtol * torch.linalg.norm(b) + 1e-12, m


@pytest.mark.parametrize("name", S.names())
def test_flower_adapter_equals_in_process_loop(name):
    strategy, ranks = _strategy(name)
    fs = FlowerStrategy(strategy, SHAPES, min_nodes=4)
    grid = FakeGrid(_nodes(ranks))
    result = fs.start(grid, ArrayRecord(), num_rounds=2, timeout=10)
    _assert_same(strategy.global_delta(), _reference(name))
    assert [r["used_clients"] for r in fs.rounds] == [[f"partition-{i}" for i in range(4)]] * 2
    assert result.train_metrics_clientapp[2]["replies-used"] == 4
    # the returned arrays are the global delta, scale-1 factors
    delta = codec.arrays_to_adapter(result.arrays)
    _assert_same(delta, strategy.global_delta(), 1e-6)
    # one hello per node, in round 1 only
    assert sum(kind == "query.hello" for _, kind in grid.sent) == 4


@pytest.mark.parametrize("fault", ["error", "timeout", "nan", "shape", "client", "offline"])
def test_bad_reply_is_dropped_and_round_goes_on(fault):
    strategy = S.get("flexlora", shapes=SHAPES)
    fs = FlowerStrategy(strategy, SHAPES, min_nodes=4)
    grid = FakeGrid(_nodes(), faults={102: {"train": fault}})
    result = fs.start(grid, ArrayRecord(), num_rounds=2, timeout=10)
    for r in fs.rounds:
        assert r["sent"] == [f"partition-{i}" for i in range(4)]
        assert r["used_clients"] == ["partition-0", "partition-1", "partition-3"]
        assert list(r["dropped"]) == ["partition-2"]  # matched to the message it answers
        assert r["aggregated"]
        received = 3 if fault == "timeout" else 4
        assert r["metrics"]["replies-received"] == received
        if fault == "offline":
            assert "Node Unavailable" in r["dropped"]["partition-2"]
    assert result.train_metrics_clientapp[1]["replies-used"] == 3
    assert result.train_metrics_clientapp[1]["replies-dropped"] == 1
    # the result equals aggregating the three good clients in-process
    ref = S.get("flexlora", shapes=SHAPES)
    specs = [ClientSpec(f"partition-{i}", {m: RANKS[i] for m in SHAPES}) for i in (0, 1, 3)]
    for rnd in (1, 2):
        payloads = [ref.configure(s, rnd) for s in specs]
        ref.configure(ClientSpec("partition-2", {m: RANKS[2] for m in SHAPES}), rnd)
        ref.aggregate(
            rnd, [_train(s, p, int(s.client_id[-1]), rnd) for s, p in zip(specs, payloads)]
        )
    _assert_same(strategy.global_delta(), ref.global_delta())


@pytest.mark.parametrize("name", S.names())
def test_a_1e6_scaled_reply_is_rejected(name):
    strategy, ranks = _strategy(name)
    fs = FlowerStrategy(strategy, SHAPES, min_nodes=4)
    grid = FakeGrid(_nodes(ranks), faults={102: {"train": "scaled"}})
    fs.start(grid, ArrayRecord(), num_rounds=2, timeout=10)
    for r in fs.rounds:
        assert list(r["dropped"]) == ["partition-2"]
        reason = r["dropped"]["partition-2"]
        # LoRA-A2 may first see the scaled frozen factor: dropped either way
        assert "robust.max_norm_ratio" in reason or (
            name == "lora_a2" and "frozen factor" in reason
        )
        assert r["used_clients"] == ["partition-0", "partition-1", "partition-3"]
    # nothing of it reached the global model: as large as the honest clients' deltas
    assert adapter_norm(strategy.global_delta()) < 1e3


def test_a_1e6_scaled_reply_is_clipped_with_the_clip_action():
    strategy = S.get("flora", shapes=SHAPES, seed=3)
    bound = NormBound(max_ratio=3.0, action="clip")
    fs = FlowerStrategy(strategy, SHAPES, min_nodes=4, norm_bound=bound)
    fs.start(FakeGrid(_nodes(), faults={101: {"train": "scaled"}}), ArrayRecord(), num_rounds=1)
    r = fs.rounds[0]
    assert not r["dropped"] and r["used"] == 4
    assert 0 < r["clipped"]["partition-1"] < 1e-4
    norms = r["update_norms"]
    others = sorted(v for k, v in norms.items() if k != "partition-1")
    assert norms["partition-1"] > 1e4 * others[-1]
    assert adapter_norm(strategy.global_delta()) < 4 * sum(others)


def test_all_replies_bad_leaves_model_unchanged():
    strategy = S.get("flora", shapes=SHAPES)
    fs = FlowerStrategy(strategy, SHAPES, min_nodes=2)
    grid = FakeGrid(_nodes([2, 4]), faults={100: {"train": "nan"}, 101: {"train": "error"}})
    result = fs.start(grid, ArrayRecord(), num_rounds=1, timeout=10)
    assert not fs.rounds[0]["aggregated"]
    assert result.train_metrics_clientapp[1]["replies-used"] == 0
    assert strategy.global_delta() == {}


@pytest.mark.parametrize(
    "declared, message",
    [
        ({"partition-id": 9, "ranks": "x_proj=4"}, "unknown module 'x_proj'"),
        ({"partition-id": 9, "rank": 0}, "rank must be >= 1"),
        ({"partition-id": 9, "rank": 17}, "exceeds min(d_out, d_in) = 16"),
        ({"partition-id": 9, "ranks": "up_proj=4"}, "no rank for module"),
        ({"partition-id": 9, "rank-type": 7}, "rank-type 7 is not one of 1..3"),
        ({"partition-id": 0, "rank": 4}, "already used by node"),
    ],
)
def test_bad_declaration_skips_node(declared, message):
    nodes = _nodes([2, 4])
    nodes[200] = declared
    strategy = S.get("flexlora", shapes=SHAPES)
    fs = FlowerStrategy(strategy, SHAPES, min_nodes=3, rank_types=[2, 4, 8])
    fs.start(FakeGrid(nodes), ArrayRecord(), num_rounds=1, timeout=10)
    assert message in fs.rejected[200]
    assert fs.rounds[0]["used_clients"] == ["partition-0", "partition-1"]


def test_resolve_spec_forms():
    s = resolve_spec({"partition-id": 3, "ranks": "q_proj=8,*=2", "alpha": 32}, 5, SHAPES)
    assert s.client_id == "partition-3" and s.alpha == 32.0
    assert s.ranks["model.layers.1.self_attn.q_proj"] == 8
    assert s.ranks["model.layers.0.mlp.up_proj"] == 2
    s = resolve_spec({"rank-type": 2}, 5, SHAPES, rank_types=[2, 4])
    assert s.client_id == "node-5" and set(s.ranks.values()) == {4} and s.resource_type == 2
    s = resolve_spec({"ranks": "layers.0.mlp.up_proj=3", "rank": 1}, 5, SHAPES)
    assert s.ranks["model.layers.0.mlp.up_proj"] == 3
    assert s.ranks["model.layers.1.mlp.up_proj"] == 1
    with pytest.raises(FedLoraError, match="not 'module=rank'"):
        resolve_spec({"ranks": "q_proj"}, 5, SHAPES)


def test_node_that_skipped_rounds_trains_from_current_global():
    """Partial participation: a node absent in round 1 joins in round 2 with the global model."""
    strategy = S.get("flora", shapes=SHAPES)
    fs = FlowerStrategy(strategy, SHAPES, min_nodes=1)
    grid = FakeGrid(_nodes([2, 4]), faults={101: {"train": "timeout"}})
    fs.start(grid, ArrayRecord(), num_rounds=1, timeout=10)
    grid.faults = {}
    fs.start(grid, ArrayRecord(), num_rounds=1, timeout=10)  # "round 1" again: fresh seed
    assert fs.rounds[0]["used_clients"] == ["partition-0"]
    assert fs.rounds[1]["used_clients"] == ["partition-0", "partition-1"]
    # node 101's second payload carried the merge of round 1's aggregate
    sent = fs._sent[101][1]
    assert sent.merge is not None


def test_server_app_build_and_evaluate_on_nodes():
    rc = {
        **RUN,
        "overrides": RUN["overrides"] + " strategy.name=lora_a2 strategy.options.global_rank=4",
        "min-nodes": 2,
        "fraction-evaluate": 1.0,
    }
    fs = build(rc)
    assert fs.strategy.name == "lora_a2" and fs.strategy.global_rank == 4
    result = fs.start(FakeGrid(_nodes([2, 8]), rc), ArrayRecord(), num_rounds=2, timeout=10)
    ev = result.evaluate_metrics_clientapp
    assert ev[2]["replies-used"] == 2 and 0 < ev[2]["loss"] < ev[1]["loss"] * 1.5
    assert result.train_metrics_clientapp[1]["upload-bytes"] > 0


def _configured(n=6):
    """Experiment-style configured clients: partition i -> client "i" (engine ids)."""
    return {
        i: ClientSpec(str(i), {m: [1, 2, 4, 8][i % 4] for m in SHAPES}, 8.0, False, 10 + i, i % 4)
        for i in range(n)
    }


def test_configured_clients_by_partition_id():
    conf = _configured()
    s = resolve_spec({"partition-id": 2}, 7, SHAPES, configured=conf)
    assert s == conf[2]
    # explicit ranks override the configured ones; the rest (id, alpha, examples) is kept
    s = resolve_spec({"partition-id": 3, "rank": 2}, 7, SHAPES, configured=conf)
    assert s.client_id == "3" and set(s.ranks.values()) == {2}
    assert s.alpha == 8.0 and s.num_examples == 13
    for declared, message in [
        ({}, "declare partition-id"),
        ({"partition-id": 6}, "not a training client"),
        ({"partition-id": 1, "rank": 99}, "rank 99 exceeds"),
    ]:
        with pytest.raises(FedLoraError, match=message):
            resolve_spec(declared, 7, SHAPES, configured=conf)


def test_clients_per_round_draws_as_the_engine():
    """With all training clients as nodes, a round's clients are the engine's clients."""
    import numpy as np

    conf = _configured(12)  # 12: client ids "10", "11" sort after "9"
    nodes = {500 - 3 * i: {"partition-id": i} for i in range(12)}  # node ids in another order
    strategy = S.get("flexlora", shapes=SHAPES)
    fs = FlowerStrategy(
        strategy, SHAPES, min_nodes=12, client_specs=conf, clients_per_round=5, sample_seed=3
    )
    rc = {**RUN, "overrides": RUN["overrides"] + " data.num_clients=12"}
    fs.start(FakeGrid(nodes, rc), ArrayRecord(), num_rounds=3, timeout=10)
    engine = np.random.default_rng([3, 7])  # fedlora.engine.runner.run_experiment's sampler
    for r in fs.rounds:
        chosen = sorted(int(c) for c in engine.choice(list(range(12)), 5, replace=False))
        assert r["used_clients"] == [str(c) for c in chosen]


def test_polling_grid_pulls_until_every_message_is_answered_or_the_timeout():
    """`PollingGrid.send_and_receive` keeps Flower's contract (push, pull until all answered
    or the timeout) with its own pull interval; other attributes are the grid's."""
    from types import SimpleNamespace

    from fedlora.flower.server_app import PollingGrid

    class Grid:
        run = "the grid's own"

        def __init__(self, answer_on: dict[str, int]) -> None:
            self.answer_on, self.pulls = answer_on, 0

        def push_messages(self, messages):
            return [m for m in messages]

        def pull_messages(self, ids):
            self.pulls += 1
            due = [i for i in ids if self.answer_on[i] == self.pulls]
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in due]

    g = Grid({"a": 1, "b": 3})
    got = PollingGrid(g, interval=0.01).send_and_receive(["a", "b"], timeout=None)
    assert sorted(m.metadata.reply_to_message_id for m in got) == ["a", "b"] and g.pulls == 3
    g = Grid({"a": 2, "b": 10**9})  # b never answers: the timeout ends the wait
    t = time.monotonic()
    got = PollingGrid(g, interval=0.01).send_and_receive(["a", "b"], timeout=0.2)
    assert [m.metadata.reply_to_message_id for m in got] == ["a"]
    assert 0.2 <= time.monotonic() - t < 2.0 and g.pulls >= 3
    assert PollingGrid(g).run == "the grid's own"


# -- issue 18: hostile nodes ------------------------------------------------------------------


def _hostile_run(fault, configured=True, declared=None):
    """Four flexlora nodes (partitions 0-3, 16 examples each); node 102 answers with `fault`
    and declares `declared` in its node config. ``configured``: the server knows each
    partition's count (as `fedlora.flower.server_app.build` does), else nothing."""
    strategy = S.get("flexlora", shapes=SHAPES, seed=3)
    nodes = _nodes()
    nodes[102].update(declared or {})
    conf = {i: ClientSpec(f"partition-{i}", {m: RANKS[i] for m in SHAPES}, 16.0, False, 16)
            for i in range(4)}  # fmt: skip
    fs = FlowerStrategy(strategy, SHAPES, min_nodes=4, client_specs=conf if configured else None)
    faults = {102: {"train": fault}} if fault else {}
    fs.start(FakeGrid(nodes, faults=faults), ArrayRecord(), num_rounds=1, timeout=10)
    return fs, adapter_norm(strategy.global_delta())


def test_a_hostile_example_count_cannot_capture_the_global_model():
    """A node declaring and reporting num_examples = 10**12 with B x 15 weighs what the server
    registered for its partition (16): the global model is what B x 15 alone gives (bounded by
    the norm screen), not the node's update; unconfigured, 4 x the round's median count."""
    _, honest = _hostile_run(None)
    fs, norm = _hostile_run("weight", declared={"num-examples": 10**12})
    r = fs.rounds[0]
    assert r["used"] == 4 and r["capped_weights"] == {"partition-2": [10**12, 16]}
    assert r["num_examples"] == 64
    _, x15 = _hostile_run("x15")
    assert norm == pytest.approx(x15, rel=1e-6)  # exactly as if it had reported 16
    assert norm < 6 * honest  # a quarter of B x 15; uncapped it was ~20x (issue 18)
    # the same node with the sign flipped cannot flip the global model either
    fs, _ = _hostile_run("weight-flip", declared={"num-examples": 10**12})
    assert fs.rounds[0]["capped_weights"]["partition-2"] == [10**12, 16]
    # nothing configured: the round's median reported count (16) x robust.max_weight_ratio 4
    fs, free = _hostile_run("weight", configured=False)
    assert fs.rounds[0]["capped_weights"] == {"partition-2": [10**12, 64]}
    assert free < 12 * honest


@pytest.mark.parametrize(
    "fault, words",
    [
        ("list-meta", "malformed 'fedlora.meta' record: a list"),
        ("negated-scale", "scale must be a finite number > 0"),
        ("int64", "A is int64, expected float32"),
        ("float16", "A is float16, expected float32"),
        ("bool-count", "num_examples must be a positive int, got True"),
    ],
)
def test_a_malformed_reply_is_a_dropped_reply_not_a_crash(fault, words):
    fs, _ = _hostile_run(fault)
    r = fs.rounds[0]
    assert list(r["dropped"]) == ["partition-2"] and words in r["dropped"]["partition-2"]
    assert r["used_clients"] == ["partition-0", "partition-1", "partition-3"] and r["aggregated"]


def test_a_lone_1e6_scaled_node_is_rejected():
    """One node per round: no round-mates. Round 1 (honest) is bounded by the fallback and
    accepted; later a 1e6-scaled reply is rejected by the history of accepted norms."""
    strategy = S.get("flexlora", shapes=SHAPES, seed=3)
    fs = FlowerStrategy(strategy, SHAPES, min_nodes=1)
    grid = FakeGrid(_nodes([4]))
    fs.start(grid, ArrayRecord(), num_rounds=1, timeout=10)
    grid.faults = {100: {"train": "scaled"}}
    fs.start(grid, ArrayRecord(), num_rounds=1, timeout=10)
    first, second = fs.rounds
    assert first["used"] == 1 and not first["dropped"]
    assert "largest median accepted norm" in second["dropped"]["partition-0"]
    assert not second["aggregated"]
    # a first round without history: the fallback bound
    fresh = FlowerStrategy(S.get("flexlora", shapes=SHAPES, seed=3), SHAPES, min_nodes=1)
    fresh.start(FakeGrid(_nodes([4]), faults={100: {"train": "scaled"}}), ArrayRecord(),
                num_rounds=1, timeout=10)  # fmt: skip
    assert "robust.fallback_max_norm = 100" in fresh.rounds[0]["dropped"]["partition-0"]


def _current_lone_bound(server) -> float:
    """What the server would accept from a client alone this round (an oracle attacker);
    before issue 27 (no ``lone_limit``): the bound as that code set it."""
    if hasattr(server.history, "lone_limit"):
        return server.history.lone_limit(server.bound)[0]
    return server.bound.limit([], server.history.reference())[0]


def test_an_escalating_lone_node_cannot_ratchet_its_bound():
    """Issue 27, the Flower engine: one node a round (clients_per_round = 1), each reply scaled
    to just under the server's current lone bound (an oracle attacker). Before: accepted
    norms x19 a round from 99; now the first-round bound follows the model (0.25 x the
    adapted base weights' norm) and no accepted norm exceeds 4 x it."""
    from fedlora.core.norms import contribution_norm

    # FLoRA starts every client from a fresh init: scaling B scales the contribution exactly
    extra = " clients_per_round=1 rounds=5 strategy.name=flora"
    rc = {**RUN, "overrides": RUN["overrides"] + extra}
    fs = build(rc)

    def attack(content):
        limit = _current_lone_bound(fs.server)
        u = codec.decode_update(content)
        n = contribution_norm(u.adapter, {m: None for m in u.adapter})
        u.adapter = scale_adapter(u.adapter, 0.99 * limit / n)
        return codec.encode_update(u)

    nodes = {100 + i: {"partition-id": i} for i in range(4)}
    grid = FakeGrid(nodes, rc, faults={n: {"train": attack} for n in nodes})
    fs.start(grid, ArrayRecord(), num_rounds=5, timeout=10)
    first = fs.server.bound.fallback_norm
    accepted = [n for r in fs.rounds for n in r["update_norms"].values()]
    assert len(accepted) == 5 and all(r["aggregated"] for r in fs.rounds)
    assert first < 1.0 and accepted[0] == pytest.approx(0.99 * first, rel=1e-4)
    assert max(accepted) <= 4 * first * 1.0001, accepted
    assert accepted == pytest.approx([0.99 * first * k for k in (1, 2, 4, 4, 4)], rel=1e-3)


class ReplayGrid(FakeGrid):
    """Node 102 answers round 2 with its round-1 reply (replayed: that message's id), or with
    a reply whose ``reply_to_message_id`` matches nothing (``forge``)."""

    def __init__(self, *a, forge=False, **k):
        super().__init__(*a, **k)
        self.forge, self.saved, self.trains = forge, None, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if not messages or messages[0].metadata.message_type != "train":
            return replies
        self.trains += 1
        mine = [r for r in replies if r.metadata.src_node_id == 102]
        if self.trains == 1:
            self.saved = mine[0]
            return replies
        rest = [r for r in replies if r.metadata.src_node_id != 102]
        if self.forge:
            mine[0].metadata.__dict__["_reply_to_message_id"] = "not-a-message-of-this-round"
            return rest + mine
        return rest + [self.saved]


@pytest.mark.parametrize("forge", [False, True])
def test_a_reply_is_tied_to_its_message_and_round(forge):
    """Issue 27: a node's round-1 reply replayed in round 2 was accepted as its round-2
    answer, and a reply whose message id matches nothing was attributed to its sender. Both
    are ignored now: node 102 has no usable reply in round 2."""
    strategy = S.get("flexlora", shapes=SHAPES, seed=3)
    fs = FlowerStrategy(strategy, SHAPES, min_nodes=4)
    fs.start(ReplayGrid(_nodes(), forge=forge), ArrayRecord(), num_rounds=2, timeout=10)
    second = fs.rounds[1]
    assert "answers no message of this round" in second["ignored"]["node-102"]
    assert second["dropped"]["partition-2"] == "no reply (failed or timed out)"
    assert "partition-2" not in second["used_clients"] and len(second["used_clients"]) == 3


def test_node_configs_known_to_the_runtime_skip_the_hello():
    """`FlowerStrategy.node_configs` (the simulation's partition ids): no hello for those
    nodes, the same clients trained as with hellos; a node it does not know is still asked."""
    conf = _configured(6)
    nodes = {500 - 3 * i: {"partition-id": i} for i in range(6)}
    rc = {**RUN, "overrides": RUN["overrides"] + " data.num_clients=6"}
    runs = {}
    for known in (None, {n: c for n, c in nodes.items() if c["partition-id"] != 4}):
        fs = FlowerStrategy(
            S.get("flexlora", shapes=SHAPES), SHAPES, min_nodes=6, client_specs=conf,
            clients_per_round=3, sample_seed=3,
        )  # fmt: skip
        if known is not None:
            fs.node_configs = lambda known=known: known
        grid = FakeGrid(nodes, rc)
        fs.start(grid, ArrayRecord(), num_rounds=2, timeout=10)
        hellos = sorted(n for n, kind in grid.sent if kind == "query.hello")
        runs[known is None] = ([r["used_clients"] for r in fs.rounds], hellos)
    assert runs[True][1] == sorted(nodes)  # without: every node was asked once
    assert runs[False][1] == [500 - 3 * 4]  # with: only the node the runtime did not know
    assert runs[True][0] == runs[False][0]
