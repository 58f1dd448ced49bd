"""What a node trains: the synthetic toy task or a real language model (run config ``model``).

Both backends give ``shapes()``, ``train(spec, payload, partition) -> ClientUpdate`` and
``evaluate(delta, spec, partition) -> (metrics, num_examples)``. The ServerApp builds the same
backend to learn the model's module shapes (the toy one costs nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedlora.contract import Adapter, ClientSpec, ClientUpdate, Payload
from fedlora.flower.toy import ToyTask, toy_shapes

_CACHE: dict[tuple, Any] = {}


def _key(run_config: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in run_config.items()))


def get_backend(run_config: Mapping[str, Any]):
    """The (per-process cached) backend for a run config."""
    key = _key(run_config)
    if key not in _CACHE:
        model = str(run_config.get("model", "toy"))
        _CACHE[key] = ToyBackend(run_config) if model == "toy" else LMBackend(run_config)
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

    def train(self, spec: ClientSpec, payload: Payload, partition: int) -> ClientUpdate:
        return self.task.train(spec, payload, partition)

    def evaluate(self, delta: Adapter | None, spec: ClientSpec, partition: int):
        n = spec.num_examples or self.task.num_examples(partition)
        return {"eval_loss": self.task.evaluate(delta, partition)}, n


class LMBackend:  # pragma: no cover  (needs fedlora.client, written separately)
    """A language model through `fedlora.models.LoraHost` and `fedlora.client.train_client`."""

    def __init__(self, rc: Mapping[str, Any]) -> None:
        from fedlora.data import load_builtin, make_federated_split
        from fedlora.models import LoraHost, default_target_modules, load_model

        self.rc = rc
        self.model, self.tokenizer = load_model(str(rc["model"]))
        self.host = LoraHost(self.model, default_target_modules(self.model))
        self.examples = load_builtin()
        self.split = make_federated_split(
            self.examples,
            str(rc.get("partition-scheme", "by_task")),
            int(rc.get("num-partitions", 4)),
            seed=int(rc.get("seed", 0)),
        )

    def shapes(self) -> dict[str, tuple[int, int]]:
        return self.host.shapes()

    def _part(self, idx: list[list[int]], partition: int):
        return [self.examples[i] for i in idx[partition % len(idx)]]

    def train(self, spec: ClientSpec, payload: Payload, partition: int) -> ClientUpdate:
        import dataclasses

        from fedlora.client import TrainConfig, train_client

        names = {f.name for f in dataclasses.fields(TrainConfig)}
        options = {k.replace("-", "_"): v for k, v in self.rc.items()}
        cfg = TrainConfig(**{k: v for k, v in options.items() if k in names})
        data = self._part(self.split.train, partition)
        return train_client(self.host, spec, payload, data, cfg, self.tokenizer)

    def evaluate(self, delta: Adapter | None, spec: ClientSpec, partition: int):
        from fedlora.evaluate import evaluate

        data = self._part(self.split.test, partition)
        with self.host.use_global(delta or {}) as model:
            metrics = evaluate(model, self.tokenizer, data, ["loss"])
        return {k: float(v) for k, v in metrics.items()}, len(data)
