"""The fedlora `ServerApp`: the experiment of ``fedlora run`` over a Flower federation.

Run config (``flower_app/pyproject.toml``, ``[tool.flwr.app.config]``, or
``flwr run --run-config``):

* ``experiment`` (default ``"tiny"``): a preset name or a TOML experiment path, and
  ``overrides``: ``"key=value ..."`` dotted keys (`fedlora.flower.experiment`). The app builds
  the model's module shapes, the clients' specs and the strategy with the federation core's
  functions (`fedlora.federation.build`), runs ``rounds`` rounds,
  samples ``clients_per_round`` nodes per round (seeded from ``seed`` as the engine does).
* ``min-nodes`` (0: ``clients_per_round``): nodes to wait for before each round;
  ``round-timeout`` (seconds); ``fraction-evaluate`` (evaluate the global delta on that
  fraction of nodes, on their held-out data, with the ``[eval]`` settings; default 0);
  ``rank-types`` (``"2,4,8,16"``: the ranks a node's ``rank-type=N`` declaration means;
  empty: the experiment's ``resources.ranks``);
* ``hello`` (default ``"auto"``): in Flower's simulation runtime the app reads each virtual
  node's ``partition-id`` from the runtime (`fedlora.flower.nodes.simulation_node_configs`)
  instead of sending it a ``query.hello``; ``"always"``: ask every node (a ClientApp whose
  hello declares more than its node config). Deployments always ask.
* ``result-dir`` (empty: the experiment's ``output_dir``): a run directory
  (`fedlora.flower.results`: locked, marked, a checkpoint after every round, ``metrics.jsonl``,
  trackers); at the end ``result.json`` (per round: clients used, dropped replies with
  reasons, metrics), ``global_delta.pt`` (the final global delta as scale-1 factors
  ``{module: (A, B)}``) and ``config.toml`` (the resolved experiment), written atomically;
* ``resume`` (default false): continue the run in ``result-dir`` after its last checkpointed
  round (a ServerApp that was killed); ``overwrite`` (default false): replace the run there
  (only the files it wrote are removed). Neither: a folder that holds a run is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedlora.flower.backend import get_backend
from fedlora.flower.results import ResultDir, flag, write_result  # noqa: F401 (re-exported)
from fedlora.flower.strategy import FlowerStrategy

app = ServerApp()


def _ints(text: Any) -> list[int]:
    return [int(x) for x in str(text).replace(" ", "").split(",") if x]


def build(run_config: Mapping[str, Any]) -> FlowerStrategy:
    """The `FlowerStrategy` a run config describes (its ``num_rounds`` attribute is set)."""
    from fedlora.federation.build import build_server, model_norm
    from fedlora.flower.experiment import experiment_config

    cfg = experiment_config(run_config)
    backend = get_backend(run_config)  # cached: may be shared with runs of other strategies
    shapes = backend.shapes()
    server = build_server(
        cfg, shapes, backend.specs, backend.split.training_clients, model_norm(backend.clients.host)
    )
    k = cfg.sampled_per_round()
    timeout = float(run_config.get("round-timeout", 120))
    rank_types = _ints(run_config.get("rank-types", "")) or list(cfg.resources.ranks or [])
    fs = FlowerStrategy(
        server.strategy,
        shapes,
        fraction_evaluate=float(run_config.get("fraction-evaluate", 0.0)),
        min_nodes=int(run_config.get("min-nodes", 0)) or k,
        rank_types=rank_types,
        default_alpha=cfg.model.alpha,
        hello_timeout=timeout,
        wait_timeout=timeout,
        sample_seed=cfg.seed,
        client_specs=backend.training_specs(),
        clients_per_round=k,
        server=server,
    )
    fs.num_rounds = cfg.rounds
    fs.result_dir = str(run_config.get("result-dir", "") or "") or cfg.output_dir
    fs.experiment = cfg
    return fs


class PollingGrid:
    """`grid` with a `send_and_receive` that pulls replies every `interval` seconds and keeps
    at most `window` messages in flight (None: all at once).

    Why the interval: Flower 1.41's Grid for deployments pulls, then sleeps 3 s between pulls,
    so every exchange (hello, train, evaluate) ends up to 3 s (1.5 s on average) after its last
    reply arrived; a pull is one small request to the SuperLink.

    Why the window (simulation runtime): Flower's simulation hands messages to its actors
    from a thread that, every 0.1 s, asks the in-memory link state for each node's messages
    (``vce_api.add_messages_to_queue``), and each ask scans every stored message: with 1,000
    nodes and a round's 50 messages stored, one sweep took 0.16 s here (0.24 s at 1,600), so
    that thread held the GIL of the ServerApp's process for most of the round. With a few
    messages in flight at a time (a new one pushed as each reply arrives) a sweep is cheap.
    Everything else is `grid`'s own.
    """

    def __init__(
        self,
        grid: Grid,
        interval: float = 0.2,
        window: int | None | Callable[[], int | None] = None,
    ) -> None:
        self._grid, self._interval, self._window = grid, interval, window

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list:
        """Flower's semantics: push, then pull until every message is answered or the
        timeout passes (None: wait for ever); returns the replies received. Messages not
        pushed when the timeout passes are not sent (no reply)."""
        todo = list(messages)
        window = self._window() if callable(self._window) else self._window
        window = window or len(todo) or 1
        end = time.monotonic() + (timeout or 0.0)
        waiting: set[str] = set()
        replies: list = []
        while todo or waiting:
            if todo and len(waiting) < window:
                take, todo = todo[: window - len(waiting)], todo[window - len(waiting) :]
                waiting |= set(self._grid.push_messages(take))
            got = list(self._grid.pull_messages(waiting)) if waiting else []
            replies.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if timeout is not None and time.monotonic() >= end:
                break
            if not got and waiting:
                time.sleep(self._interval)
        return replies


def simulation_window(run_config: Mapping[str, Any]) -> int | None:
    """Messages in flight in the simulation runtime (run config ``simulation-in-flight``):
    ``"auto"``: twice the Ray cluster's CPUs (at least 4; an upper bound on the actors
    with 1 CPU or more each); an integer; 0: all at once."""
    value = str(run_config.get("simulation-in-flight", "auto"))
    if value != "auto":
        return int(value) or None
    import sys

    ray = sys.modules.get("ray")  # the simulation runtime's driver runs in this process
    cpus = ray.cluster_resources().get("CPU", 0) if ray is not None and ray.is_initialized() else 0
    return max(4, 2 * int(cpus))


def _polling(grid: Grid, rc: Mapping[str, Any], simulation: bool) -> Any:
    """A Grid that pushes and pulls (every Flower runtime's) wrapped in `PollingGrid` (in the
    simulation runtime: a short pull interval and a window decided at each exchange, when
    Ray is up); a test double that only answers send_and_receive as it is."""
    if not hasattr(grid, "pull_messages"):
        return grid
    if simulation:
        return PollingGrid(grid, 0.02, lambda: simulation_window(rc))
    return PollingGrid(grid)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    fs = build(rc)
    simulation = type(grid).__name__ == "InMemoryGrid"  # Flower's simulation runtime
    if str(rc.get("hello", "auto")) != "always":  # the simulation's nodes: no hello round
        from fedlora.flower.nodes import simulation_node_configs

        fs.node_configs = lambda: simulation_node_configs(grid)
    results = ResultDir(fs, resume=flag(rc.get("resume")), overwrite=flag(rc.get("overwrite")))
    done = results.open()  # locked, checked, and restored from its checkpoint (resume)
    failed = True
    try:
        fs.start(
            # a Grid that pushes and pulls (every Flower runtime's); a test double that only
            # answers send_and_receive is used as it is
            _polling(grid, rc, simulation),
            initial_arrays=ArrayRecord(),
            num_rounds=max(0, fs.num_rounds - done),
            timeout=float(rc.get("round-timeout", 600)),
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
        )
        failed = False
    finally:
        results.close(failed)
