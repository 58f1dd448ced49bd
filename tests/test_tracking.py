"""Trackers (`fedlora.federation.tracking`): what TensorBoard, MLflow and W&B's own readers see
after a
tiny run, resume into the same tracker run, and a failing backend that never stops a run."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest

from fedlora.cli.commands import main
from fedlora.engine import RunStopped, run_experiment
from fedlora.federation.config import ConfigError, load_preset
from fedlora.federation.tracking import (
    STATE_FILE,
    TensorBoardBackend,
    TrackingConfig,
    WandbBackend,
    round_metrics,
)

ROUNDS = 3


def tiny(out, backends, **extra):
    return load_preset(
        "tiny",
        {
            "output_dir": str(out),
            "rounds": ROUNDS,
            "clients_per_round": 2,
            "data.num_clients": 3,
            "data.max_examples_per_client": 8,
            "train.local_steps": 1,
            "eval.metrics": ["loss", "accuracy"],
            "eval.max_examples": 4,
            "eval.bootstrap": 20,
            "eval.unseen_tasks": False,
            "tracking.backends": backends,
            **extra,
        },
    )


def expected(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per round, the values the trackers must hold, read back from metrics.jsonl."""
    out: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        want = out.setdefault(row["round"], {})
        if row["kind"] == "round":
            want["train_loss"] = row["train_loss"]
            want["bytes_up"] = row["bytes_up"]
        elif row["set"] == "seen_clients":
            want["seen_clients/loss"] = row["loss"]
            want["seen_clients/loss_ci95_high"] = row["loss_ci95"][1]
    return out


# -- readers: each backend's own --------------------------------------------------------------


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def wandb_records(path: Path):
    """The records of a W&B ``run-<id>.wandb`` file, parsed with wandb's own protobuf (the
    file is a LevelDB-style log: a 7-byte header, 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_history(run_dir: Path) -> tuple[set[str], set[str], dict[int, dict[str, float]]]:
    """(run ids, groups, step -> logged values) over every offline run folder of a run."""
    ids, groups, steps = set(), set(), {}
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.add(r.run.run_id)
                groups.add(r.run.run_group)
            elif kind == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in r.history.item
                }
                steps.setdefault(int(items["_step"]), {}).update(items)
    return ids, groups, steps


def mlflow_runs(store: Path, project: str = "fedlora"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name(project)
    return client, client.search_runs([exp.experiment_id])


# -- tests ------------------------------------------------------------------------------------


def test_round_metrics_flattens_round_and_eval_rows():
    rows = [
        {"kind": "round", "round": 2, "train_loss": 1.5, "bytes_up": 10, "aggregated": True,
         "dropped": {"3": "nan loss"}, "clipped": {"1": 0.5}, "update_norms": {"1": 2.0},
         "clients": ["1", "3"], "epsilon": 4.0},
        {"kind": "eval", "round": 2, "set": "seen_clients", "loss": 2.0,
         "loss_ci95": [1.8, 2.2], "wn_antonym/loss": float("nan")},
    ]  # fmt: skip
    m = round_metrics(rows)
    assert m["train_loss"] == 1.5 and m["bytes_up"] == 10 and m["epsilon"] == 4.0
    assert m["drops"] == 1 and m["clipped"] == 1 and m["aggregated"] == 1.0
    assert m["seen_clients/loss"] == 2.0
    assert (m["seen_clients/loss_ci95_low"], m["seen_clients/loss_ci95_high"]) == (1.8, 2.2)
    assert "seen_clients/wn_antonym/loss" not in m  # NaN is left out
    assert not any(k.startswith("client/") for k in m)
    m = round_metrics(rows, per_client=True, client_losses={"1": 0.7})
    assert m["client/1/update_norm"] == 2.0 and m["client/1/clipped"] == 0.5
    assert m["client/3/dropped"] == 1.0 and m["client/1/train_loss"] == 0.7


def test_tracking_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"tracking\.backends\[1\] = 'neptune'"):
        load_preset("tiny", {"tracking.backends": ["mlflow", "neptune"]})
    assert TrackingConfig(backends=["wandb", "wandb"]).problems()


def stop_after(n):
    def hook(rnd, result):
        if rnd == n:
            raise RunStopped(f"stopped after round {n}")

    return hook


def test_every_backend_sees_each_round_and_resume_continues_the_same_run(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    cfg = tiny(out, ["tensorboard", "mlflow", "wandb"], **{"tracking.per_client": True})
    with pytest.raises(RunStopped):
        run_experiment(cfg, progress=False, on_round_end=stop_after(2))
    first = json.loads((out / STATE_FILE).read_text())
    assert first["last_round"] == 2 and set(first["backends"]) == {"tensorboard", "mlflow", "wandb"}
    run_experiment(cfg, resume=True, progress=False)
    state = json.loads((out / STATE_FILE).read_text())
    assert state["last_round"] == ROUNDS
    assert state["backends"]["mlflow"]["run_id"] == first["backends"]["mlflow"]["run_id"]
    assert state["backends"]["wandb"]["run_id"] == first["backends"]["wandb"]["run_id"]
    want = expected(out)
    assert sorted(want) == [1, 2, 3]

    scalars = tensorboard_scalars(out)
    for key in ("train_loss", "seen_clients/loss", "seen_clients/loss_ci95_high"):
        assert [s for s, _ in scalars[key]] == [1, 2, 3], key  # no round twice after resume
        for step, value in scalars[key]:
            assert value == pytest.approx(want[step][key], rel=1e-6), (key, step)
    assert any(k.startswith("client/") for k in scalars)  # per_client

    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run, resumed
    run_id = runs[0].info.run_id
    assert runs[0].data.params["strategy.name"] == "flexlora"
    for key in ("train_loss", "bytes_up", "seen_clients/loss"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in hist] == [1, 2, 3], key
        assert [v for _, v in hist] == pytest.approx([want[s][key] for s in (1, 2, 3)])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"adapter", "summary.json"} <= artifacts

    ids, _, steps = wandb_history(out)
    assert ids == {first["backends"]["wandb"]["run_id"]}  # both sessions are the one run
    assert sorted(steps) == [1, 2, 3]
    for step in (1, 2, 3):
        assert steps[step]["train_loss"] == pytest.approx(want[step]["train_loss"])
        assert steps[step]["seen_clients/loss"] == pytest.approx(want[step]["seen_clients/loss"])


def test_a_failing_backend_is_a_warning_not_a_lost_run(tmp_path, monkeypatch, caplog):
    pytest.importorskip("tensorboard")

    def no_network(self, req):
        raise ConnectionError("wandb.ai unreachable")

    real = TensorBoardBackend.log_metrics

    def disk_full_from_round_2(self, metrics, step):
        if step >= 2:
            raise OSError(28, "No space left on device")
        real(self, metrics, step)

    monkeypatch.setattr(WandbBackend, "open", no_network)
    monkeypatch.setattr(TensorBoardBackend, "log_metrics", disk_full_from_round_2)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        result = run_experiment(tiny(out, ["wandb", "tensorboard"]), progress=False)
    assert len(result.round_rows()) == ROUNDS and (out / "adapter").is_dir()
    warnings = [r.getMessage() for r in caplog.records if "tracking:" in r.getMessage()]
    assert len(warnings) == 2, warnings  # one per backend, then it is off
    assert "wandb failed to open" in warnings[0] and "unreachable" in warnings[0]
    assert "tensorboard failed to log round 2" in warnings[1]
    assert [s for s, _ in tensorboard_scalars(out)["train_loss"]] == [1]


def test_compare_is_a_parent_run_with_a_child_per_strategy_and_one_wandb_group(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    out = tmp_path / "cmp"
    code = main(
        ["compare", "--preset", "tiny", "--strategies", "flexlora,flora", "--rounds", "1", "-q",
         "--output-dir", str(out), "--data.num_clients", "3", "--clients_per_round", "2",
         "--eval.max_examples", "4", "--eval.bootstrap", "0", "--train.local_steps", "1",
         "--tracking.backends", "mlflow,wandb"]
    )  # fmt: skip
    assert code == 0
    client, runs = mlflow_runs(out)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.tags["strategy"] for r in children} == {"flexlora", "flora"}
    assert {"compare.txt", "compare.json"} <= {
        a.path for a in client.list_artifacts(parents[0].info.run_id)
    }
    child_artifacts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert "plots" in child_artifacts  # the CLI's plots, after the run
    groups = set()
    for name in ("flexlora", "flora"):
        ids, g, steps = wandb_history(out / name)
        assert len(ids) == 1 and sorted(steps) == [1]
        groups |= g
    assert len(groups) == 1 and next(iter(groups))  # one shared, non-empty group
