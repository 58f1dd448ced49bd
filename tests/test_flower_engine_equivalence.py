"""The same experiment on the in-process engine and on Flower gives the same global delta.

The ``tiny`` preset (tiny random Llama), 4 clients with different ranks (one per resource type:
ranks 8/4/2/1; rank 4 for all with fedit and fedex_lora, which need one rank), all 4 sampled
per round, 2 rounds, seed 0, every fedlora strategy. The engine runs `run_experiment`
(evaluation off); Flower runs the real ServerApp ``main`` from the same run config
(``experiment`` + ``overrides``) over an in-process Grid that hands every message, through
Flower's protobuf serialisation, to the real ClientApp's handlers (``hello``, ``train``) with
the node config of a simulation SuperNode (``partition-id``). Flower's simulation engine
(`flwr.simulation.run_simulation`) needs Ray, which is not installed here, hence the Grid.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from flower_grid import task_identity, wire  # noqa: E402, F401 (autouse fixture)
from flwr.app import Context, Message, RecordDict  # noqa: E402

import fedlora.strategies as S  # noqa: E402
from fedlora.engine.runner import run_experiment  # noqa: E402
from fedlora.federation.config import load_config  # noqa: E402
from fedlora.flower import backend, client_app, server_app  # noqa: E402
from fedlora.flower.experiment import parse_overrides  # noqa: E402

OVERRIDES = (
    "data.num_clients=4 clients_per_round=4 rounds=2 eval.seen_clients=false "
    "eval.unseen_clients=false eval.unseen_tasks=false"
)
# one client per resource type: ranks 8, 4, 2, 1
HETEROGENEOUS = "resources.distribution=custom resources.custom_share=[1,1,1,1]"






class ClientAppGrid:
    """A Grid whose nodes run the real ClientApp handlers in this process."""

    def __init__(self, node_configs, run_config):
        self.node_configs = node_configs
        self.run_config = run_config
        self.sent: list[tuple[int, str]] = []

    def get_node_ids(self):
        return list(self.node_configs)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            self.sent.append((node, kind))
            ctx = Context(1, node, dict(self.node_configs[node]), RecordDict(), self.run_config)
            inbound = Message(wire(msg.content), dst_node_id=node, message_type=kind)
            handler = {
                "query.hello": client_app.hello,
                "train": client_app.train,
                "evaluate": client_app.evaluate,
            }[kind]
            out = handler(inbound, ctx)
            replies.append(Message(wire(out.content), reply_to=msg))
        return replies


# fedit and fedex_lora average A and B separately: one rank for every client
HOMOGENEOUS = "resources.distribution=homogeneous resources.homogeneous_rank=4"


def _overrides(strategy: str) -> str:
    resources = HOMOGENEOUS if strategy in ("fedit", "fedex_lora") else HETEROGENEOUS
    return f"{OVERRIDES} {resources} strategy.name={strategy}"


def _engine(strategy: str, tmp_path, extra: str = ""):
    overrides = parse_overrides(f"{_overrides(strategy)} {extra}")
    overrides["output_dir"] = str(tmp_path / "engine")
    cfg = load_config("tiny", overrides)
    return run_experiment(cfg, progress=False, save_final=False)


def _flower(strategy: str, tmp_path, extra: str = "", node_extra=None):
    rc = {
        "experiment": "tiny",
        "overrides": f"{_overrides(strategy)} {extra}",
        "result-dir": str(tmp_path / "flower"),
        "round-timeout": 10,
    }
    node = {"num-partitions": 4, **(node_extra or {})}
    nodes = {100 + i: {"partition-id": i, **node} for i in range(4)}
    grid = ClientAppGrid(nodes, rc)
    server_app.main(grid, Context(1, 0, {}, RecordDict(), rc))
    result = json.loads((tmp_path / "flower" / "result.json").read_text())
    delta = torch.load(tmp_path / "flower" / "global_delta.pt")
    return result, delta, grid


@pytest.mark.parametrize("strategy", S.names())
def test_engine_and_flower_give_the_same_global_delta(strategy, tmp_path):
    loads = backend.LOADS["experiment"]
    ref = _engine(strategy, tmp_path)
    result, delta, grid = _flower(strategy, tmp_path)

    # the same clients: engine client ids, configured ranks, all 4 used in both rounds
    ranks = sorted({min(s.ranks.values()) for s in ref.specs})
    assert ranks == ([4] if strategy in ("fedit", "fedex_lora") else [1, 2, 4, 8])
    assert {n["client_id"]: n["ranks"] for n in result["nodes"].values()} == {
        s.client_id: s.ranks for s in ref.specs
    }
    assert [r["used_clients"] for r in result["rounds"]] == [["0", "1", "2", "3"]] * 2
    assert [r["clients"] for r in ref.round_rows()] == [["0", "1", "2", "3"]] * 2
    # the same global delta, per module, to 1e-5 relative
    want = ref.strategy.global_delta()
    assert set(delta) == set(want) and want
    for m, f in want.items():
        A, B = delta[m]
        got, exp = (B.double() @ A.double()), f.delta(torch.float64)
        assert exp.norm() > 0, m
        assert (got - exp).norm() <= 1e-5 * exp.norm(), (m, float((got - exp).norm() / exp.norm()))
    # the nodes loaded the model at most once (cached across rounds and messages)
    assert backend.LOADS["experiment"] - loads <= 1
    assert sum(kind == "train" for _, kind in grid.sent) == 8
    assert sum(kind == "query.hello" for _, kind in grid.sent) == 4


@pytest.mark.parametrize("mode, strategy", [("central", "flexlora"), ("local", "ffa_lora")])
def test_flower_applies_the_same_privacy_as_the_engine(mode, strategy, tmp_path):
    """Central DP in the ServerApp's strategy adapter, DP-SGD in the ClientApp: the same global
    delta (seeded noise, the reproducible and not-private opt-in) and the same epsilon as the
    in-process engine."""
    extra = f"privacy.mode={mode} privacy.clip_norm=0.5 privacy.noise_multiplier=1.0"
    extra += " privacy.insecure_seeded_noise=true"  # the same noise in both engines
    ref = _engine(strategy, tmp_path, extra)
    # the nodes allow the seeded noise (a node refuses it unless its own config does)
    result, delta, _ = _flower(strategy, tmp_path, extra, {"dp-allow-seeded-noise": True})
    assert result["privacy"] == ref.summary["privacy"]
    assert 0 < result["privacy"]["epsilon"] < float("inf")
    assert [r["metrics"]["epsilon"] for r in result["rounds"]] == [
        r["epsilon"] for r in ref.round_rows()
    ]
    for m, f in ref.strategy.global_delta().items():
        A, B = delta[m]
        got, exp = (B.double() @ A.double()), f.delta(torch.float64)
        assert (got - exp).norm() <= 1e-5 * exp.norm(), m


def test_one_round_close_for_both_engines_with_a_dropped_client_under_local_dp(
    tmp_path, monkeypatch
):
    """The federation core closes the round in both engines: client 2 sends NaN factors every
    round (dropped by the update check), the rest train with DP-SGD. The round rows are the
    same (clients, drops with their reasons, norms, losses, bytes, epsilon), and so are the
    privacy records: every client sent a payload is accounted, the dropped one too."""
    from fedlora.clients import train as client_train
    from fedlora.federation.checkpoint import load_checkpoint

    honest = client_train.train_client

    def poisoned(host, spec, payload, examples, *a, **k):
        u = honest(host, spec, payload, examples, *a, **k)
        if spec.client_id == "2":
            m = next(iter(u.adapter))
            f = u.adapter[m]
            u.adapter[m] = type(f)(f.A, torch.full_like(f.B, float("nan")), f.scale)
        return u

    monkeypatch.setattr(client_train, "train_client", poisoned)
    extra = "privacy.mode=local privacy.clip_norm=0.5 privacy.noise_multiplier=1.0"
    extra += " privacy.insecure_seeded_noise=true"  # the same noise in both engines
    ref = _engine("flexlora", tmp_path, extra)
    # the nodes allow the seeded noise the run config asks for (else they refuse it)
    result, _, _ = _flower("flexlora", tmp_path, extra, {"dp-allow-seeded-noise": True})
    rows = ref.round_rows()
    assert [sorted(r["dropped"]) for r in rows] == [["2"], ["2"]]
    assert "non-finite" in rows[0]["dropped"]["2"] or "NaN" in rows[0]["dropped"]["2"]
    assert [r["used"] for r in rows] == [3, 3] and all(r["aggregated"] for r in rows)
    for want, got in zip(rows, result["rounds"]):
        want = {k: v for k, v in want.items() if not k.startswith(("time_", "mem_"))}
        assert {k: got[k] for k in want} == want
    ledger = load_checkpoint(ref.run_dir)["privacy"]
    assert "secret" in ledger and "secret" not in result["privacy_ledger"]
    del ledger["secret"]  # kept in the checkpoint only, never in result.json
    assert result["privacy_ledger"] == json.loads(json.dumps(ledger))
    assert sorted(ledger["clients"]) == ["0", "1", "2", "3"]  # the dropped client too
    assert all(len(h) == 2 for h in ledger["clients"].values())
    assert result["privacy"] == ref.summary["privacy"]
    # the ServerApp's metrics.jsonl (a run directory since issue 27) withholds the same
    # per-client values as result.json (issue 26)
    text = (tmp_path / "flower" / "metrics.jsonl").read_text()
    rows = [json.loads(x) for x in text.splitlines() if x.strip()]
    assert len(rows) == 2
    for row in rows:
        assert not ({"client_metrics", "update_norms", "capped_weights"} & set(row)), sorted(row)
        assert row.get("train_loss") is None


def test_flower_evaluates_the_global_delta_on_nodes(tmp_path):
    """``fraction-evaluate``: nodes evaluate the global delta on their held-out examples."""
    rc = {
        "experiment": "tiny",
        "overrides": f'{_overrides("flora")} rounds=1 eval.metrics=["loss"]',
        "result-dir": str(tmp_path),
        "fraction-evaluate": 1.0,
        "round-timeout": 10,
    }
    nodes = {100 + i: {"partition-id": i} for i in range(4)}
    server_app.main(ClientAppGrid(nodes, rc), Context(1, 0, {}, RecordDict(), rc))
    result = json.loads((tmp_path / "result.json").read_text())
    (ev,) = result["evaluate"]
    assert ev["replies-used"] == 4 and ev["num_examples"] > 0 and ev["loss"] > 0


def test_overrides_run_config_key():
    from fedlora.federation.config import ConfigError
    from fedlora.flower.experiment import experiment_config

    text = 'rounds=5 eval.metrics=["loss", "f1"] name="a b" strategy.options={split = "sqrt"}'
    assert parse_overrides(text) == {
        "rounds": "5",
        "eval.metrics": '["loss", "f1"]',
        "name": '"a b"',
        "strategy.options": '{split = "sqrt"}',
    }
    cfg = experiment_config({"experiment": "tiny", "overrides": "rounds=5 eval.metrics=loss,f1"})
    assert cfg.rounds == 5 and cfg.eval.metrics == ["loss", "f1"] and cfg.model.name == "tiny-llama"
    for bad in ("rounds", 'name="a', "eval.metrics=[loss"):
        with pytest.raises(ConfigError):
            parse_overrides(bad)
    with pytest.raises(ConfigError, match="rounds"):
        experiment_config({"experiment": "tiny", "overrides": "rounds=0"})
    # parsed once per process: a caller changing its copy changes nobody else's
    cfg.rounds = 99
    again = experiment_config({"experiment": "tiny", "overrides": "rounds=5 eval.metrics=loss,f1"})
    assert again.rounds == 5 and again is not cfg
