"""What a node trains: the experiment of ``fedlora run``, built once per process.

Run config ``experiment`` (a preset name or TOML path, plus ``overrides``) selects an
`fedlora.flower.experiment.ExperimentBackend`: the engine's model, data and client specs, and
the engine's client (`fedlora.clients.train.train_client`). Backends are cached per process (a
module-level cache keyed by `fedlora.flower.experiment.backend_key`): a process that handles
several messages (a simulation actor, a long-lived ClientApp process of
`fedlora.flower.node_runner`, a test's grid) builds the model once. The cache keeps the latest
backend only.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()
# how many backends this process built, and the seconds the last build took (tests, replies)
LOADS: dict[str, float] = {"experiment": 0, "seconds": 0.0}


def get_backend(run_config: Mapping[str, Any]):
    """The (per-process cached) `ExperimentBackend` for a run config."""
    from fedlora.flower.experiment import ExperimentBackend, backend_key, experiment_config

    cfg = experiment_config(run_config)
    key = backend_key(cfg)
    with _LOCK:
        if key not in _CACHE:
            _CACHE.clear()  # one model per process
            _CACHE[key] = ExperimentBackend(cfg)
            LOADS["experiment"] += 1
            LOADS["seconds"] = _CACHE[key].load_seconds
        return _CACHE[key]
