"""A plain Flower app with its own model and data using a fedlora strategy and fedlora's
client training (`fedlora.flower.user_app`, ``examples/flower_user_app``).

The fast test runs the example's ServerApp ``main`` over a grid that calls the example's
ClientApp handlers in this process (messages through Flower's wire format); the simulation
test runs the documented ``flwr run examples/flower_user_app local-simulation`` against a
local simulation SuperLink it starts (runtime dependency installation off) and stops.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")
from flower_grid import task_identity, wire  # noqa: E402, F401 (autouse fixture)
from flwr.app import Context, Message, RecordDict  # noqa: E402

from fedlora.flower.local import exe, simulation_superlink, stop  # noqa: E402
from fedlora.flower.user_app import fedlora_strategy  # noqa: E402

pytestmark = pytest.mark.flower
ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower_user_app"


@pytest.fixture
def user_app(monkeypatch):
    """The example's package ``user_app``, importable as `flwr run` makes it."""
    monkeypatch.syspath_prepend(str(APP))
    for name in [m for m in sys.modules if m == "user_app" or m.startswith("user_app.")]:
        monkeypatch.delitem(sys.modules, name)
    import user_app.client_app
    import user_app.server_app

    return user_app






class AppGrid:
    """A Grid whose nodes run the example ClientApp's handlers in this process."""

    def __init__(self, client_app, nodes: dict[int, dict], run_config: dict) -> None:
        self.handlers = {"query.hello": client_app.hello, "train": client_app.train}
        self.nodes, self.run_config = nodes, run_config

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            ctx = Context(1, node, dict(self.nodes[node]), RecordDict(), self.run_config)
            out = self.handlers[kind](
                Message(wire(msg.content), dst_node_id=node, message_type=kind), ctx
            )
            replies.append(Message(wire(out.content), reply_to=msg))
        return replies


def run_config(**extra) -> dict:
    import tomllib

    rc = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**rc, **extra}


@pytest.mark.parametrize("strategy", ["flexlora", "hetlora"])
def test_user_server_and_client_apps_train_with_a_fedlora_strategy(user_app, tmp_path, strategy):
    rc = run_config(strategy=strategy, **{"result-dir": str(tmp_path)})
    nodes = {
        7: {"partition-id": 0, "num-partitions": 2},
        9: {"partition-id": 1, "num-partitions": 2},
    }
    user_app.server_app.main(
        AppGrid(user_app.client_app, nodes, rc), Context(1, 0, {}, RecordDict(), rc)
    )
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["strategy"] == strategy
    # each node's declared rank (rank-by-partition "2,4"), under its declared client id
    assert {c: set(r.values()) for c, r in result["nodes"].items()} == {
        "site-0": {2},
        "site-1": {4},
    }
    assert [sorted(r["used_clients"]) for r in result["rounds"]] == [["site-0", "site-1"]] * 2
    assert all(not r["dropped"] for r in result["rounds"])
    norms = result["global_delta_fro"]
    assert len(norms) == 4 and all(v > 0 for v in norms.values())  # q_proj, v_proj x 2 layers


def test_fedlora_strategy_names_an_unknown_strategy():
    with pytest.raises(ValueError, match="strategy 'flexlor': unknown; strategies: .*flexlora"):
        fedlora_strategy("flexlor", {"m": (4, 4)})


@pytest.mark.simulation
def test_example_app_runs_on_the_local_simulation(tmp_path):
    pytest.importorskip("ray")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(APP / "flwr-home" / "config.toml", home / "config.toml")
    out = tmp_path / "result"
    with open(tmp_path / "superlink.log", "w") as log:
        link, env = simulation_superlink(
            home, log, extra=["--disable-runtime-dependency-installation"]
        )
        try:
            proc = subprocess.Popen(
                [exe("flwr"), "run", str(APP), "local-simulation", "--stream",
                 "--run-config", f'strategy="flexlora" result-dir="{out}"'],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True,
            )  # fmt: skip
            try:
                text, _ = proc.communicate(timeout=300)
            finally:
                stop([proc])
        finally:
            stop([link])
    assert proc.returncode == 0 and (out / "result.json").exists(), text[-5000:]
    result = json.loads((out / "result.json").read_text())
    assert sorted(result["nodes"]) == ["site-0", "site-1"]
    assert [sorted(r["used_clients"]) for r in result["rounds"]] == [["site-0", "site-1"]] * 2
    assert all(v > 0 for v in result["global_delta_fro"].values())
