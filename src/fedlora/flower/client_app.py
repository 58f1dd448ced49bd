"""The fedlora `ClientApp`: answers hello with the node's declared config, trains, evaluates.

What it trains comes from the run config (`fedlora.flower.backend.get_backend`): by default
the experiment of ``fedlora run`` (run config ``experiment`` + ``overrides``), where the node's
``partition-id`` is the engine's client index (its data); the model is loaded once per process
and cached. Training is seeded from (experiment seed, client id, server round), as in the
in-process engine.

Model builds: ``context.state`` (which Flower keeps per node and run between messages, also
when every message runs in a fresh ClientApp process) counts how often this node built the
model in this run; train and evaluate replies carry the count (``model-builds``) and the
seconds of the last build in `codec.NODE_METRICS`. A SuperNode whose ClientApp process lives
for the whole run (`fedlora.flower.node_runner`, simulation actors) builds it once.

Stateless: each train message carries the payload (merge, adapter, seed, trainable, extras) and
the node's resolved `ClientSpec`, so a node that skipped rounds starts from the current global
model. The handlers are plain functions of records, so they run the same under a SuperNode,
the simulation engine or a test's fake grid.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedlora.flower import backend, codec
from fedlora.flower.backend import get_backend
from fedlora.flower.nodes import declared_config

app = ClientApp()


def partition_of(node_config: Mapping[str, Any]) -> int:
    return int(node_config.get("partition-id", 0))


def hello_content(node_config: Mapping[str, Any]) -> RecordDict:
    return RecordDict({codec.NODE: declared_config(node_config)})


def train_content(
    content: RecordDict, node_config: Mapping[str, Any], run_config: Mapping[str, Any]
) -> RecordDict:
    """Decode the payload, train on this node's partition, encode the update."""
    payload = codec.decode_payload(content)
    spec = codec.decode_spec(content.config_records[codec.SPEC])
    config = content.config_records.get("config")
    server_round = int(config.get("server-round", 0)) if config is not None else 0
    node = get_backend(run_config)
    from fedlora.core.privacy import node_local_dp
    from fedlora.flower.experiment import experiment_config

    # the experiment's local DP-SGD, unless it would weaken the node's own (then: refused)
    privacy = node_local_dp(node.local_dp(experiment_config(run_config)), node_config)
    update = node.train(
        spec, payload, partition_of(node_config), server_round=server_round, privacy=privacy
    )
    reply = codec.encode_update(update)
    reply[codec.NODE] = declared_config(node_config)  # lets the server see a changed declaration
    return reply


def evaluate_content(
    content: RecordDict, node_config: Mapping[str, Any], run_config: Mapping[str, Any]
) -> RecordDict:
    """Evaluate the global delta (sent as ``merge``, with the global ``dense`` tensors) on this
    node's local data."""
    payload = codec.decode_payload(content)
    spec = codec.decode_spec(content.config_records[codec.SPEC])
    metrics, n = get_backend(run_config).evaluate(
        payload.merge, spec, partition_of(node_config), payload.dense
    )
    return RecordDict({codec.METRICS: MetricRecord({**metrics, "num-examples": int(n)})})


BUILDS = "fedlora.builds"  # context.state record: this node's model builds in this run


def count_builds(context: Context, new: int) -> int:
    """Add `new` builds to this node's count for the run (in ``context.state``); the total."""
    rec = context.state.config_records.get(BUILDS) or ConfigRecord({"model-builds": 0})
    rec["model-builds"] = int(rec["model-builds"]) + new
    context.state[BUILDS] = rec
    return int(rec["model-builds"])


def _with_node_metrics(
    content: RecordDict, context: Context, builds_before: int, started: float
) -> RecordDict:
    new = backend.LOADS["experiment"] - builds_before
    content[codec.NODE_METRICS] = MetricRecord(
        {
            "model-builds": count_builds(context, new),
            "model-load-seconds": float(backend.LOADS["seconds"]) if new else 0.0,
            # the handler's wall time: decode, model build (if any), training, encode
            "handler-seconds": time.perf_counter() - started,
        }
    )
    content[codec.NODE_PLACE] = place()
    return content


def place() -> ConfigRecord:
    """Where this handler runs: host, process id and (in a Ray actor of the simulation
    runtime) the Ray node id, so a run on a Ray cluster shows which node trained whom."""
    import os
    import socket
    import sys

    rec = ConfigRecord({"host": socket.gethostname(), "pid": os.getpid()})
    ray = sys.modules.get("ray")  # imported by the simulation runtime's actors only
    if ray is not None and ray.is_initialized():
        rec["ray-node-id"] = ray.get_runtime_context().get_node_id()
    return rec


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    return Message(hello_content(context.node_config), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedlora.core.privacy import PrivacyRefusal

    started, before = time.perf_counter(), backend.LOADS["experiment"]
    try:
        content = train_content(msg.content, context.node_config, context.run_config)
    except PrivacyRefusal as e:  # the node's one-line reason, for the server's round row
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(e)), reply_to=msg)
    content = _with_node_metrics(content, context, before, started)
    from fedlora.flower.experiment import experiment_config

    if experiment_config(context.run_config).privacy.mode == "local":
        # the training time tells a long example from a short one: a local-DP node keeps it
        del content[codec.NODE_METRICS]["handler-seconds"]
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    started, before = time.perf_counter(), backend.LOADS["experiment"]
    content = evaluate_content(msg.content, context.node_config, context.run_config)
    return Message(_with_node_metrics(content, context, before, started), reply_to=msg)
