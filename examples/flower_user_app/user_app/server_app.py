"""The researcher's ServerApp: Flower's own loop, a fedlora strategy doing the aggregation."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedlora.clients.host import LoraHost
from fedlora.flower.user_app import fedlora_strategy
from user_app.task import TARGETS, build_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    shapes = LoraHost(build_model(), TARGETS).shapes()  # the modules the clients adapt
    strategy = fedlora_strategy(str(rc["strategy"]), shapes, min_nodes=2)
    strategy.start(
        grid,
        initial_arrays=ArrayRecord(),  # clients are stateless: payloads carry the model
        num_rounds=int(rc["num-server-rounds"]),
        timeout=300,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    delta = strategy.strategy.global_delta()
    if rc.get("result-dir"):
        out = Path(str(rc["result-dir"]))
        out.mkdir(parents=True, exist_ok=True)
        result = {
            "strategy": strategy.strategy.name,
            "nodes": {s.client_id: dict(s.ranks) for s in strategy.specs.values()},
            "rounds": strategy.rounds,
            "global_delta_fro": {m: float(f.delta().norm()) for m, f in delta.items()},
        }
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
