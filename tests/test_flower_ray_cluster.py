"""The fedlora Flower app on a two-node Ray cluster (both nodes on 127.0.0.1), as across machines.

A head and a second Ray node are started as two ``ray start --block`` processes with 1 CPU each
(`fedlora.flower.local.ray_cluster`); the local simulation SuperLink is started with
``RAY_ADDRESS`` = the head, so its run's ``flwr-simulation`` joins that cluster instead of
starting its own; ``flwr run flower_app local-simulation`` with 6 virtual SuperNodes of 1 CPU
each then gets one ClientApp actor per node. Checked: every round's replies come from both Ray
nodes (``client_places`` in result.json: the Ray node id of the actor that trained each client)
and the global delta equals `run_experiment`'s to 1e-5 relative per module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from fedlora.engine.runner import run_experiment
from fedlora.federation.config import load_config
from fedlora.flower.experiment import parse_overrides
from fedlora.flower.local import exe, ray_cluster, ray_nodes, simulation_superlink, stop

pytest.importorskip("ray")
pytestmark = [pytest.mark.flower, pytest.mark.simulation]

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = "rounds=2 clients_per_round=6 strategy.name=flexlora"


def test_two_node_ray_cluster_equals_engine(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ROOT / "flwr-home" / "config.toml", home / "config.toml")
    out = tmp_path / "sim"
    # Ray's socket paths must stay under 107 characters: a short directory of its own
    ray_tmp = Path(tempfile.mkdtemp(prefix="fl-ray-", dir="/tmp"))
    log = open(tmp_path / "processes.log", "w")  # noqa: SIM115 - closed in finally
    procs = []
    try:
        address, procs = ray_cluster(ray_tmp, log, cpus=(1, 1))
        nodes = ray_nodes(address)
        assert len(nodes) == 2, nodes
        link, env = simulation_superlink(home, log, ray_address=address)
        procs.append(link)
        run = subprocess.run(
            [exe("flwr"), "run", "flower_app", "local-simulation", "--stream",
             "--federation-config", "num-supernodes=6 client-resources-num-cpus=1",
             "--run-config", f'overrides="{OVERRIDES}" result-dir="{out}"'],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        stop(procs)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    text = run.stdout + run.stderr
    assert run.returncode == 0 and (out / "result.json").exists(), text[-5000:]
    result = json.loads((out / "result.json").read_text())

    o = parse_overrides(OVERRIDES)
    o["output_dir"] = str(tmp_path / "engine")
    for key in ("eval.seen_clients", "eval.unseen_clients", "eval.unseen_tasks"):
        o[key] = "false"
    ref = run_experiment(load_config("tiny", o), progress=False, save_final=False)

    clients = [str(i) for i in range(6)]
    assert [r["used_clients"] for r in result["rounds"]] == [clients] * 2
    placed = {}  # Ray node id -> clients it trained (both rounds)
    for r in result["rounds"]:
        assert set(r["client_places"]) == set(clients)
        for c, where in r["client_places"].items():
            placed.setdefault(where["ray-node-id"], []).append(c)
    print("\nclients per Ray node:", {n[:12]: sorted(c) for n, c in placed.items()})
    assert set(placed) == set(nodes), (placed, nodes)  # both nodes trained clients
    delta = torch.load(out / "global_delta.pt")
    want = ref.strategy.global_delta()
    assert set(delta) == set(want) and want
    worst = 0.0
    for m, f in want.items():
        A, B = delta[m]
        got, exp = B.double() @ A.double(), f.delta(torch.float64)
        assert exp.norm() > 0, m
        worst = max(worst, float((got - exp).norm() / exp.norm()))
    print(f"global delta vs run_experiment: largest relative difference {worst:.2e}")
    assert worst <= 1e-5
