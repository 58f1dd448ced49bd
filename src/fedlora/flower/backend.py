"""What a node trains: the experiment of ``fedlora run`` or the synthetic toy task.

Run config ``experiment`` (a preset name or TOML path, plus ``overrides``) selects an
`fedlora.flower.experiment.ExperimentBackend`: the engine's model, data and client specs.
``experiment = "toy"`` (or the legacy ``model = "toy"``) selects `ToyBackend`, a synthetic
pure-torch task for smoke tests that costs nothing to build.

Both give ``shapes()``, ``train(spec, payload, partition, server_round) -> ClientUpdate`` and
``evaluate(delta, spec, partition) -> (metrics, num_examples)``. Backends are cached per process
(a module-level cache): a process that handles several messages (simulation, a test's grid, a
long-lived ClientApp process) loads the model once. The cache keeps the latest experiment
backend only.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from fedlora.contract import Adapter, ClientSpec, ClientUpdate, Payload
from fedlora.flower.toy import ToyTask, toy_shapes

_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()
LOADS = {"experiment": 0}  # how many experiment backends this process built (tests, logs)


def is_toy(run_config: Mapping[str, Any]) -> bool:
    return str(run_config.get("experiment", "")) == "toy" or (
        "experiment" not in run_config and str(run_config.get("model", "")) == "toy"
    )


def _toy_key(run_config: Mapping[str, Any]) -> tuple:
    return ("toy",) + tuple(sorted((k, str(v)) for k, v in run_config.items()))


def get_backend(run_config: Mapping[str, Any]):
    """The (per-process cached) backend for a run config."""
    if is_toy(run_config):
        key = _toy_key(run_config)
        with _LOCK:
            if key not in _CACHE:
                _CACHE[key] = ToyBackend(run_config)
            return _CACHE[key]
    from fedlora.flower.experiment import ExperimentBackend, backend_key, experiment_config

    cfg = experiment_config(run_config)
    key = ("experiment", *backend_key(cfg))
    with _LOCK:
        if key not in _CACHE:
            for old in [k for k in _CACHE if k[0] == "experiment"]:
                del _CACHE[old]  # one model per process
            _CACHE[key] = ExperimentBackend(cfg)
            LOADS["experiment"] += 1
        return _CACHE[key]


class ToyBackend:
    def __init__(self, rc: Mapping[str, Any]) -> None:
        shapes = toy_shapes(
            int(rc.get("toy-layers", 2)),
            int(rc.get("toy-d-model", 16)),
            int(rc.get("toy-d-ff", 24)),
        )
        self.task = ToyTask(shapes, int(rc.get("seed", 0)), int(rc.get("toy-steps", 5)))

    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self.task.shapes)

    def train(
        self, spec: ClientSpec, payload: Payload, partition: int, server_round: int = 0
    ) -> ClientUpdate:
        return self.task.train(spec, payload, partition)

    def evaluate(self, delta: Adapter | None, spec: ClientSpec, partition: int):
        n = spec.num_examples or self.task.num_examples(partition)
        return {"eval_loss": self.task.evaluate(delta, partition)}, n
