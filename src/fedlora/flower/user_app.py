"""fedlora strategies and client training inside a user's own Flower app.

A plain Flower 1.41 app (the user's ``pyproject.toml``, model and data) needs three calls
(docs/flower.md, "Your own Flower app"; ``examples/flower_user_app`` runs them):

* ServerApp: ``fs = fedlora_strategy("flexlora", shapes, default_rank=4)`` (any name of
  `fedlora.strategies.names()` and its options), then Flower's own
  ``fs.start(grid, initial_arrays=ArrayRecord(), num_rounds=..., timeout=...)``. ``shapes``
  (module -> (d_out, d_in)) come from the user's model: ``LoraHost(model, targets).shapes()``.
* ClientApp, ``@app.query("hello")``: ``return hello_reply(msg, context, rank=8)``: the node
  declares its identity and ranks (`fedlora.flower.nodes`: ``rank``, ``ranks``,
  ``client-id``, ``num-examples`` ...; the node config's own keys are declared too).
* ClientApp, ``@app.train()``: ``return train_reply(msg, context, host, examples, cfg)``:
  fedlora's client training (`fedlora.clients.train.train_client`) of the payload on the user's
  `fedlora.clients.host.LoraHost` and examples.

Clients are stateless: each train message carries the merge, adapter, seed and the node's
resolved spec, so the user's ClientApp keeps nothing between rounds. Every node must build
the same base model (same weights: a checkpoint, or a seeded initialisation) as the server's
shapes describe. The global LoRA delta after the run is ``fs.strategy.global_delta()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import Context, Message

from fedlora.flower import codec
from fedlora.flower.client_app import hello_content
from fedlora.flower.nodes import declared_config
from fedlora.flower.strategy import FlowerStrategy


def fedlora_strategy(
    name: str,
    shapes: Mapping[str, tuple[int, int]],
    *,
    seed: int = 0,
    min_nodes: int = 1,
    default_rank: int | None = None,
    clients_per_round: int | None = None,
    fraction_train: float = 1.0,
    options: Mapping[str, Any] | None = None,
    **flower_options: Any,
) -> FlowerStrategy:
    """A Flower strategy that runs fedlora's strategy `name` (with its ``options``) on the
    modules `shapes`. ``default_rank``: the rank of a node that declares none; nodes are
    sampled as ``clients_per_round`` (seeded by `seed`, as the in-process engine does) or
    ``fraction_train``; `flower_options` go to `FlowerStrategy` (``hello_timeout``,
    ``norm_bound``, ``rank_types`` ...)."""
    import fedlora.strategies as registry

    if name not in registry.names():
        raise ValueError(f"strategy {name!r}: unknown; strategies: {', '.join(registry.names())}")
    strategy = registry.get(name, seed=seed, shapes=dict(shapes), **dict(options or {}))
    return FlowerStrategy(
        strategy,
        shapes,
        fraction_train=fraction_train,
        min_nodes=min_nodes,
        default_rank=default_rank,
        sample_seed=seed,
        clients_per_round=clients_per_round,
        **flower_options,
    )


def _declared(context: Context, declare: Mapping[str, Any]) -> dict[str, Any]:
    return {**dict(context.node_config), **{k.replace("_", "-"): v for k, v in declare.items()}}


def hello_reply(msg: Message, context: Context, **declare: Any) -> Message:
    """The answer to `FlowerStrategy`'s hello: the node config's declared keys, with
    `declare` on top (``rank=8``, ``ranks="q_proj=4,v_proj=8"``, ``client_id="hospital-3"``;
    underscores become dashes)."""
    return Message(hello_content(_declared(context, declare)), reply_to=msg)


def train_reply(
    msg: Message,
    context: Context,
    host: Any,
    examples: Sequence[Any],
    cfg: Any = None,
    tokenizer: Any = None,
    *,
    privacy: Any = None,
    **declare: Any,
) -> Message:
    """Train the payload of a `FlowerStrategy` train message on `host` (a
    `fedlora.clients.host.LoraHost` over the user's model) with `examples` and `cfg` (a
    `fedlora.clients.train.TrainConfig`; see `fedlora.clients.train.train_client` for the example
    formats
    and ``privacy``), and reply with the encoded update. The server keeps the node's hello
    declaration unless `declare` is given (the whole declaration, as for `hello_reply`:
    ``rank=2`` after a node lost memory), which then applies from the next round."""
    from fedlora.clients.train import train_client

    payload = codec.decode_payload(msg.content)
    spec = codec.decode_spec(msg.content.config_records[codec.SPEC])
    config = msg.content.config_records.get("config")
    server_round = int(config.get("server-round", 0)) if config is not None else 0
    update = train_client(
        host, spec, payload, examples, cfg, tokenizer, server_round=server_round, privacy=privacy
    )
    reply = codec.encode_update(update)
    if declare:
        reply[codec.NODE] = declared_config(_declared(context, declare))
    return Message(reply, reply_to=msg)
