"""The in-process engine: `run_experiment` simulates every client on one loaded base model."""

from fedlora.engine.runner import (
    RunResult,
    RunStopped,
    build_strategy,
    client_specs,
    deterministic,
    load_base_model,
    run_experiment,
)
from fedlora.engine.tiny import TINY_MODELS, build_tiny

__all__ = [
    "TINY_MODELS",
    "RunResult",
    "RunStopped",
    "build_strategy",
    "build_tiny",
    "client_specs",
    "deterministic",
    "load_base_model",
    "run_experiment",
]
