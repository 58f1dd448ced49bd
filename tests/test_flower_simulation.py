"""The same experiment on Flower's simulation runtime (Ray) and on the in-process engine.

Runs the documented command from the repository root,

    FLWR_HOME=<copy of flwr-home> flwr run flower_app local-simulation --stream \
        --run-config 'experiment="tiny" overrides="..." result-dir="..."'

with the federation `local-simulation` as shipped (6 virtual SuperNodes, one per client of the
``tiny`` preset, 1 CPU each), and checks that the global delta equals ``fedlora run``'s
(`run_experiment`) to 1e-5 relative per module for flexlora, flora and lora_a2, with every
client trained in both rounds (clients 0-5, the preset's uniform ranks 1/2/4/8).

`flwr run` starts a detached local simulation SuperLink itself when none answers on its port;
the test starts that SuperLink (the same command line, free ports on 127.0.0.1 passed to
`flwr` with FLWR_LOCAL_SUPERLINK_HTTP_API_PORT / FLWR_LOCAL_CONTROL_API_PORT) so that it can
stop it by PID. Ray is started by each run's `flwr-simulation` process and shut down at its
end; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray on the loopback address, and Ray's
daemons share the fate of that process (the SuperLink's process group, stopped at the end).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fedlora.engine.runner import run_experiment
from fedlora.federation.config import load_config
from fedlora.flower.experiment import parse_overrides
from fedlora.flower.local import exe, simulation_superlink, stop

pytest.importorskip("ray")
pytestmark = [pytest.mark.flower, pytest.mark.simulation]

ROOT = Path(__file__).resolve().parents[1]
# all 6 clients of the tiny preset (6 virtual SuperNodes) in both rounds
OVERRIDES = "rounds=2 clients_per_round=6"


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    """A local simulation SuperLink on free loopback ports; yields (env, tmp dir)."""
    tmp = tmp_path_factory.mktemp("simulation")
    home = tmp / "home"
    home.mkdir()
    shutil.copy(ROOT / "flwr-home" / "config.toml", home / "config.toml")
    with open(tmp / "superlink.log", "w") as log:
        link, env = simulation_superlink(home, log)
        try:
            yield {**env, "RAY_DEDUP_LOGS": "0"}, tmp
        finally:
            stop([link])


STRATEGIES = ["flexlora", "flora", "lora_a2"]


@pytest.fixture(scope="module")
def simulated(simulation):
    """The three runs, one after another on the one SuperLink (each run's ``flwr-simulation``
    starts and stops its own Ray; started side by side, Ray's start-up timed out on a loaded
    2-core machine): strategy -> (result.json, global delta)."""
    env, tmp = simulation
    done = {}
    for strategy in STRATEGIES:
        out = tmp / strategy
        proc = subprocess.Popen(
            [exe("flwr"), "run", "flower_app", "local-simulation", "--stream", "--run-config",
             f'experiment="tiny" overrides="{OVERRIDES} strategy.name={strategy}" '
             f'result-dir="{out}"'],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            text, _ = proc.communicate(timeout=600)
        finally:
            stop([proc])
        assert proc.returncode == 0 and (out / "result.json").exists(), text[-5000:]
        assert "(6 simulated SuperNodes)" in text, text[-3000:]
        done[strategy] = (
            json.loads((out / "result.json").read_text()),
            torch.load(out / "global_delta.pt"),
        )
    return done


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_simulation_runtime_equals_engine(simulation, simulated, strategy):
    _, tmp = simulation
    result, delta = simulated[strategy]
    overrides = f"{OVERRIDES} strategy.name={strategy}"

    o = parse_overrides(overrides)
    o["output_dir"] = str(tmp / f"engine-{strategy}")
    for key in ("eval.seen_clients", "eval.unseen_clients", "eval.unseen_tasks"):
        o[key] = "false"  # evaluation does not change training
    ref = run_experiment(load_config("tiny", o), progress=False, save_final=False)

    # one virtual SuperNode per client: partition id = engine client, its configured ranks
    assert {n["client_id"]: n["ranks"] for n in result["nodes"].values()} == {
        s.client_id: s.ranks for s in ref.specs
    }
    assert len({min(s.ranks.values()) for s in ref.specs}) > 1  # heterogeneous ranks
    clients = [str(i) for i in range(6)]
    assert [r["used_clients"] for r in result["rounds"]] == [clients] * 2
    assert [r["clients"] for r in ref.round_rows()] == [clients] * 2
    builds = {}  # node -> its model builds in the run (cumulative, from Flower's node state)
    for r in result["rounds"]:
        assert r["dropped"] == {} and r["metrics"]["replies-received"] == 6
        builds.update({c: m["model-builds"] for c, m in r["client_metrics"].items()})
    # Ray actors live for the run: the model was built at most once per actor (1 CPU each),
    # not once per message (12 train messages)
    assert 1 <= sum(builds.values()) <= min(os.cpu_count() or 1, 6), builds
    want = ref.strategy.global_delta()
    assert set(delta) == set(want) and want
    for m, f in want.items():
        A, B = delta[m]
        got, exp = B.double() @ A.double(), f.delta(torch.float64)
        assert exp.norm() > 0, m
        assert (got - exp).norm() <= 1e-5 * exp.norm(), (m, float((got - exp).norm() / exp.norm()))
