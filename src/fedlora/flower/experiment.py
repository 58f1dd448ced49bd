"""The experiment configuration of ``fedlora run`` on Flower.

Run config keys (``[tool.flwr.app.config]`` or ``flwr run --run-config``):

* ``experiment``: a preset name (``fedlora presets``) or the path of a TOML experiment file, as
  for ``fedlora run``;
* ``overrides``: dotted ``key=value`` pairs separated by spaces, e.g.
  ``"rounds=2 clients_per_round=2 strategy.name=flora"``; values are TOML literals or bare
  text, parsed to each key's type by `fedlora.federation.config.apply_overrides` (lists:
  ``eval.metrics=["loss", "f1"]`` or ``eval.metrics=loss,f1``).

`ExperimentBackend` builds what a node (and the ServerApp) needs exactly as the in-process
engine does, with the federation core's `fedlora.federation.build.build_clients`. Partition
id ``i`` is the engine's client ``i`` (its data and its `ClientSpec`, client id ``str(i)``), so a
Flower run trains the same clients with the
same seeds as ``fedlora run``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from fedlora.core.contract import Adapter, ClientSpec, ClientUpdate, FedLoraError, Payload
from fedlora.federation.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    load_config,
    to_dict,
)

LOG = logging.getLogger("fedlora.flower")


def _split(text: str) -> list[str]:
    """Split on whitespace outside quotes and brackets, keeping quotes (TOML values)."""
    parts, cur, depth, quote = [], "", 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch.isspace() and depth <= 0:
            if cur:
                parts.append(cur)
            cur = ""
            continue
        cur += ch
    if quote or depth > 0:
        raise ConfigError(f"run config overrides: unbalanced quotes or brackets in {text!r}")
    return parts + ([cur] if cur else [])


def parse_overrides(text: str) -> dict[str, str]:
    """``'rounds=2 eval.metrics=["loss", "f1"]'`` -> ``{"rounds": "2", "eval.metrics":
    '["loss", "f1"]'}``: values are split off at whitespace outside quotes and brackets and
    left as text, parsed to each field's type by `fedlora.federation.config.apply_overrides`."""
    out: dict[str, str] = {}
    for part in _split(str(text or "")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"run config overrides: {part!r} is not 'key=value'")
        out[key.strip()] = value
    return out


_CONFIGS: dict[tuple, ExperimentConfig] = {}  # (experiment, overrides, file mtime) -> config


def experiment_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The validated `ExperimentConfig` of run config keys ``experiment`` and ``overrides``.

    Parsed once per process and run config (a copy is returned): every train and evaluate
    message asks for it, and parsing (presets, overrides, type checks) took ~25 ms, most of a
    tiny client's handler time in a simulation actor. A TOML path is parsed again when its
    modification time changes."""
    import copy
    import os

    source = str(run_config.get("experiment", "") or "tiny")
    text = str(run_config.get("overrides", "") or "")
    key = (source, text, os.path.getmtime(source) if os.path.isfile(source) else None)
    if key not in _CONFIGS:
        cfg = load_config(source, validate=False)
        # string values are parsed to each field's type, exactly as
        # `fedlora.federation.config.override`
        cfg = apply_overrides(cfg, parse_overrides(text), validate=True)
        if len(_CONFIGS) > 16:
            _CONFIGS.clear()
        _CONFIGS[key] = cfg
    return copy.deepcopy(_CONFIGS[key])


def backend_key(cfg: ExperimentConfig) -> tuple:
    """What a node's backend depends on: not the strategy, rounds, sampling or evaluation."""
    d = to_dict(cfg)
    return tuple(
        (k, repr(d.get(k)))
        for k in ("seed", "threads", "model", "data", "resources", "train", "eval")
    )


class ExperimentBackend:
    """The federation's client side (`fedlora.federation.build.build_clients`: model, data and
    client specs) for one experiment, built once per process.

    ``train`` and ``evaluate`` hold a lock: the one `LoraHost` serves one client at a time
    (a process running several ClientApps in threads shares it safely).
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        from fedlora.federation.build import build_clients, set_threads

        t0 = time.perf_counter()
        self.cfg = cfg  # only its `backend_key` parts are this backend's: see get_backend
        set_threads(cfg.threads)
        self.clients = build_clients(cfg)  # this node's device (train.device "auto": its GPU)
        if cfg.train.parallel_clients != 1:  # docs/flower.md: a node trains one client a call
            LOG.info("train.parallel_clients: ignored by the Flower apps (one client per call)")
        self.lock = threading.Lock()
        self.load_seconds = time.perf_counter() - t0
        LOG.info(
            "fedlora: loaded %s for experiment %s in %.1fs", cfg.model.name, cfg.name,
            self.load_seconds,
        )  # fmt: skip

    @property
    def specs(self) -> list[ClientSpec]:
        return self.clients.specs

    @property
    def split(self):
        return self.clients.split

    # -- what the ServerApp needs -----------------------------------------------------------

    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self.clients.host.shapes())

    def training_specs(self) -> dict[int, ClientSpec]:
        """Partition id -> configured `ClientSpec`, for the clients that train."""
        return {c: self.specs[c] for c in self.split.training_clients}

    # -- what a node does -------------------------------------------------------------------

    def _client(self, partition: int) -> int:
        n = len(self.split.train)
        if not 0 <= partition < n:
            raise FedLoraError(f"partition-id {partition} is not a client of 0..{n - 1}")
        return partition

    def local_dp(self, cfg: ExperimentConfig):
        """The DP-SGD options of `cfg`'s local privacy mode (None in other modes), resolved
        exactly as the in-process engine resolves them (`build_privacy`), cached per setting."""
        from fedlora.core.privacy import LocalDP
        from fedlora.federation.build import build_privacy

        if cfg.privacy.mode != "local":
            return None
        key = repr((cfg.privacy, cfg.rounds, cfg.clients_per_round, cfg.train))
        cache = self.__dict__.setdefault("_local_dp", {})
        if key not in cache:
            ledger = build_privacy(cfg, self.specs, self.split.training_clients)
            # the node's own noise: a secret drawn from its OS at each call, never sent
            cache[key] = (
                LocalDP(ledger.clip_norm, ledger.noise_multiplier, None, ledger.seeded)
                if ledger is not None
                else None
            )
        return cache[key]

    def train(
        self,
        spec: ClientSpec,
        payload: Payload,
        partition: int,
        server_round: int = 0,
        privacy: Any = None,
    ) -> ClientUpdate:
        """Train the node's client (`spec`: the spec the server sent) on partition
        `partition`'s data; ``privacy``: its DP-SGD options (`local_dp`)."""
        c = self._client(partition)
        with self.lock:
            return self.clients.train(c, payload, server_round, privacy, spec=spec)

    def evaluate(
        self, delta: Adapter | None, spec: ClientSpec, partition: int, dense: dict | None = None
    ):
        """The global delta (and dense tensors: a classifier head) on the client's held-out
        test examples (``cfg.eval`` settings)."""
        from fedlora.clients.evaluate import evaluate

        c, e = self.clients, self.cfg.eval
        data = [c.examples[i] for i in self.split.test[self._client(partition)]][: e.max_examples]
        if not data:
            return {}, 0
        with self.lock, c.host.use_global(delta or {}, dense) as model:
            out = evaluate(
                model,
                c.tokenizer,
                data,
                e.metrics,
                batch_size=e.batch_size,
                max_new_tokens=e.max_new_tokens,
                max_length=self.cfg.train.max_length,
                kind=self.cfg.model.kind,
                labels=c.labels,
                label_to_id=c.label_to_id,
                per_task=False,
                precision=self.cfg.train.precision,
            )
        return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}, len(data)
