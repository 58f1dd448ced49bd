"""The fedlora `ServerApp`: any registered fedlora strategy over a Flower federation.

Run config (``flower_app/pyproject.toml``, ``[tool.flwr.app.config]``): ``strategy``,
``strategy-options`` (JSON), ``num-server-rounds``, ``model`` (``"toy"`` or a model name/path),
``rank-types``, ``default-rank``, ``alpha``, ``min-nodes``, ``fraction-train``,
``fraction-evaluate``, ``round-timeout``, ``seed`` and ``result-dir``: if set, the app writes
``result.json`` (per round: clients used, dropped replies with reasons, metrics) and
``global_delta.pt`` (the final global delta as scale-1 factors) there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

import fedlora.strategies
from fedlora.flower.backend import get_backend
from fedlora.flower.strategy import FlowerStrategy

app = ServerApp()


def _ints(text: Any) -> list[int]:
    return [int(x) for x in str(text).replace(" ", "").split(",") if x]


def build(run_config: Mapping[str, Any]) -> FlowerStrategy:
    """The `FlowerStrategy` a run config describes."""
    shapes = get_backend(run_config).shapes()
    options = json.loads(str(run_config.get("strategy-options", "") or "{}"))
    options.setdefault("seed", int(run_config.get("seed", 0)))
    strategy = fedlora.strategies.get(
        str(run_config.get("strategy", "flexlora")), shapes=shapes, **options
    )
    default_rank = int(run_config.get("default-rank", 0)) or None
    return FlowerStrategy(
        strategy,
        shapes,
        fraction_train=float(run_config.get("fraction-train", 1.0)),
        fraction_evaluate=float(run_config.get("fraction-evaluate", 0.0)),
        min_nodes=int(run_config.get("min-nodes", 1)),
        rank_types=_ints(run_config.get("rank-types", "")),
        default_rank=default_rank,
        default_alpha=float(run_config.get("alpha", 16.0)),
        hello_timeout=float(run_config.get("round-timeout", 120)),
        wait_timeout=float(run_config.get("round-timeout", 120)),
        sample_seed=int(run_config.get("seed", 0)),
    )


def write_result(fs: FlowerStrategy, result_dir: str) -> None:
    os.makedirs(result_dir, exist_ok=True)
    delta = fs.strategy.global_delta() if any(r["error"] is None for r in fs.rounds) else {}
    torch.save(
        {m: (f.A, f.B) for m, f in delta.items()}, os.path.join(result_dir, "global_delta.pt")
    )
    result = {
        "strategy": fs.strategy.name,
        "nodes": {
            str(n): {"client_id": s.client_id, "ranks": dict(s.ranks)} for n, s in fs.specs.items()
        },
        "rejected": {str(n): why for n, why in fs.rejected.items()},
        "rounds": fs.rounds,
        "evaluate": fs.eval_rounds,
        "global_delta_fro": {m: float(f.delta().norm()) for m, f in delta.items()},
    }
    with open(os.path.join(result_dir, "result.json"), "w") as fh:
        json.dump(result, fh, indent=1)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    fs = build(rc)
    try:
        fs.start(
            grid,
            initial_arrays=ArrayRecord(),
            num_rounds=int(rc.get("num-server-rounds", 2)),
            timeout=float(rc.get("round-timeout", 600)),
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
        )
    finally:
        if rc.get("result-dir"):
            write_result(fs, str(rc["result-dir"]))
