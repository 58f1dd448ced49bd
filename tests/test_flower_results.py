"""Issue 27: the ServerApp's result folder is a run directory (locked, marked, a checkpoint
every round, resumable, tracked), and what nodes send is validated before it reaches a file.
The nodes run the real ClientApp handlers in this process (`ClientAppGrid`)."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from flower_grid import task_identity, wire  # noqa: E402, F401 (autouse fixture)
from flwr.app import ConfigRecord, Context, RecordDict  # noqa: E402
from test_flower_engine_equivalence import ClientAppGrid, _overrides  # noqa: E402

import fedlora.federation.checkpoint as ckpt  # noqa: E402
from fedlora.core.contract import FedLoraError  # noqa: E402
from fedlora.federation import runfiles  # noqa: E402
from fedlora.flower import codec, server_app  # noqa: E402


def _rc(out, extra="", **more):
    return {"experiment": "tiny", "overrides": f"{_overrides('flexlora')} {extra}",
            "result-dir": str(out), "round-timeout": 10, **more}  # fmt: skip


NODES = {100 + i: {"partition-id": i} for i in range(4)}


class KilledGrid(ClientAppGrid):
    """Dies (as a SIGKILLed ServerApp would stop) when round `die_at`'s train messages go out;
    node 102 may answer with a `place` record of its own."""

    def __init__(self, nodes, rc, die_at=None, place=None):
        super().__init__(nodes, rc)
        self.die_at, self.place, self.trains = die_at, place, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.trains += 1
            if self.trains == self.die_at:
                raise KeyboardInterrupt("killed")
        replies = super().send_and_receive(messages, timeout=timeout)
        if self.place is not None:
            for r in replies:
                if r.metadata.src_node_id == 102 and r.metadata.message_type == "train":
                    r.content.config_records[codec.NODE_PLACE] = ConfigRecord(self.place)
        return replies


def _main(grid, rc):
    server_app.main(grid, Context(1, 0, {}, RecordDict(), rc))


def test_a_bytes_valued_node_place_does_not_break_result_json(tmp_path):
    """Before issue 27 ``write_result`` raised "Object of type bytes is not JSON serializable"
    in a ``finally`` and left result.json cut short."""
    out = tmp_path / "r"
    rc = _rc(out, "rounds=1")
    _main(KilledGrid(NODES, rc, place={"host": b"\x00\xff" * 100, "pid": 7}), rc)
    result = json.loads((out / "result.json").read_text())
    place = result["rounds"][0]["client_places"]["2"]
    assert place["pid"] == 7 and "host" not in place and "host" in place["invalid"]
    assert "result.json" in runfiles.claimed(out)


def test_a_killed_server_app_resumes_from_its_checkpoint(tmp_path):
    """The ServerApp stops after round 2 of 3 (KeyboardInterrupt in round 3, as a kill). Its
    folder holds round 2's checkpoint (strategy, norm history, sampler); a second ServerApp
    without ``resume`` is refused, with ``resume = true`` it trains round 3 only, and ends
    with the global delta of an uninterrupted run."""
    whole = tmp_path / "whole"
    rc = _rc(whole, "rounds=3 clients_per_round=2")
    _main(ClientAppGrid(NODES, rc), rc)
    ref = torch.load(whole / "global_delta.pt")

    out = tmp_path / "killed"
    rc = _rc(out, "rounds=3 clients_per_round=2")
    with pytest.raises(KeyboardInterrupt):
        _main(KilledGrid(NODES, rc, die_at=3), rc)
    state = ckpt.load_checkpoint(out)
    assert state["round"] == 2 and state["server"]["norm_history"]["medians"]
    with pytest.raises(FedLoraError, match="already holds a run"):
        _main(ClientAppGrid(NODES, rc), rc)
    grid = ClientAppGrid(NODES, {**rc, "resume": True})
    _main(grid, {**rc, "resume": True})
    assert sum(kind == "train" for _, kind in grid.sent) == 2  # round 3's two clients only
    result = json.loads((out / "result.json").read_text())
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3]
    got = torch.load(out / "global_delta.pt")
    for m, (a, b) in ref.items():
        assert torch.equal(got[m][0], a) and torch.equal(got[m][1], b), m
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]


def test_the_result_folder_is_locked_and_tracked(tmp_path):
    out = tmp_path / "r"
    rc = _rc(out, 'rounds=1 tracking.backends=["tensorboard"]')
    lock = runfiles.hold(out, resume=False, overwrite=False)
    try:
        with pytest.raises(FedLoraError, match="in use by another fedlora run"):
            _main(ClientAppGrid(NODES, rc), rc)
    finally:
        lock.release()
    _main(ClientAppGrid(NODES, rc), rc)
    files = runfiles.claimed(out)
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files), files
    assert {"result.json", "metrics.jsonl", "checkpoint.safetensors", "config.toml"} <= set(files)
