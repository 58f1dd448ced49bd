"""Node identity: what a SuperNode declares with ``--node-config`` and how the server resolves
it into a `ClientSpec`.

A node declares (all optional, in ``flower-supernode --node-config '...'``):

* ``client-id``: stable client name (default ``partition-<partition-id>``, else
  ``node-<node id>``). Strategies keep per-client state (HetLoRA's pruned ranks) under it.
* ``partition-id``: which data partition the node trains on.
* ``ranks``: per-module ranks, ``"q_proj=8,v_proj=4"``; a key names a module exactly or by its
  last dotted components (``q_proj`` matches ``model.layers.0.self_attn.q_proj``); ``*`` is the
  default for every other module.
* ``rank``: one rank for every module not named in ``ranks``.
* ``rank-type``: resource type N (1-based) -> the N-th entry of the run config ``rank-types``.
* ``alpha``, ``rslora``, ``num-examples``.

The node sends these raw values (`declared_config`); the server validates them against the
model's modules (`resolve_spec`): unknown module, rank < 1 or rank above min(d_out, d_in)
raise a `FedLoraError` that names the node.

With an experiment configuration the server passes ``configured`` (partition id -> the
engine's `ClientSpec` of each training client): ``partition-id`` is then required and selects
the client; its configured ranks, alpha, rsLoRA and example count apply, and its client id is
the engine's (``"3"``), unless the node declares ``rank``/``ranks``/``rank-type`` (its ranks),
``client-id``, ``alpha``, ``rslora`` or ``num-examples`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ConfigRecord

from fedlora.core.contract import ClientSpec, FedLoraError

DECLARED_KEYS = (
    "client-id",
    "partition-id",
    "ranks",
    "rank",
    "rank-type",
    "alpha",
    "rslora",
    "num-examples",
)


def declared_config(node_config: Mapping[str, Any]) -> ConfigRecord:
    """The node's declared identity (the `DECLARED_KEYS` found in its node config)."""
    return ConfigRecord({k: node_config[k] for k in DECLARED_KEYS if k in node_config})


def _int(value: Any, what: str, who: str) -> int:
    try:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError
        return int(float(value))
    except (TypeError, ValueError):
        raise FedLoraError(f"{who}: {what} must be an integer, got {value!r}") from None


def _matches(key: str, module: str) -> bool:
    return module == key or module.endswith("." + key)


def parse_ranks(text: str, who: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise FedLoraError(f"{who}: ranks entry {part!r} is not 'module=rank'")
        key, value = (s.strip() for s in part.split("=", 1))
        out[key] = _int(value, f"rank of {key!r}", who)
    return out


def _configured_client(
    pid: Any, node_id: int, configured: Mapping[int, ClientSpec] | None
) -> ClientSpec | None:
    """The experiment's client of partition id `pid` (None without ``configured``)."""
    if configured is None:
        return None
    who = f"node {node_id}"
    if pid is None:
        raise FedLoraError(f"{who}: declare partition-id (the experiment's client index)")
    p = _int(pid, "partition-id", who)
    if p not in configured:
        ids = sorted(configured)
        raise FedLoraError(
            f"{who}: partition-id {p} is not a training client of the experiment "
            f"(training clients: {ids[0]}..{ids[-1]})"
            if ids
            else f"{who}: the experiment has no training clients"
        )
    return configured[p]


def _declared_ranks(
    declared: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, int]],
    who: str,
    rank_types: Sequence[int],
    default_rank: int | None,
) -> dict[str, int]:
    """Every module's rank from a node's ``ranks`` / ``rank`` / ``rank-type`` declaration."""
    fallback = default_rank
    if "rank-type" in declared:
        t = _int(declared["rank-type"], "rank-type", who)
        if not 1 <= t <= len(rank_types):
            raise FedLoraError(
                f"{who}: rank-type {t} is not one of 1..{len(rank_types)} "
                f"(run config rank-types = {list(rank_types)})"
            )
        fallback = int(rank_types[t - 1])
    if "rank" in declared:
        fallback = _int(declared["rank"], "rank", who)

    named = parse_ranks(declared.get("ranks", ""), who)
    if "*" in named:
        fallback = named.pop("*")
    for key in named:
        if not any(_matches(key, m) for m in shapes):
            raise FedLoraError(
                f"{who}: unknown module {key!r} in ranks (modules: {sorted(shapes)[:4]} ...)"
            )
    ranks: dict[str, int] = {}
    for module in shapes:
        hits = [k for k in named if _matches(k, module)]
        if hits:  # the longest (most specific) key wins
            ranks[module] = named[max(hits, key=len)]
        elif fallback is not None:
            ranks[module] = fallback
        else:
            raise FedLoraError(
                f"{who}: no rank for module {module!r}; declare ranks=..., rank=N or rank-type=N"
            )
    for module, r in ranks.items():
        limit = min(shapes[module])
        if r < 1:
            raise FedLoraError(f"{who}, module {module}: rank must be >= 1, got {r}")
        if r > limit:
            raise FedLoraError(
                f"{who}, module {module}: rank {r} exceeds min(d_out, d_in) = {limit}"
            )
    return ranks


def resolve_spec(
    declared: Mapping[str, Any],
    node_id: int,
    shapes: Mapping[str, tuple[int, int]],
    *,
    rank_types: Sequence[int] = (),
    default_rank: int | None = None,
    default_alpha: float = 16.0,
    configured: Mapping[int, ClientSpec] | None = None,
) -> ClientSpec:
    """The `ClientSpec` of a node from its declared config, validated against `shapes`
    (and, with ``configured``, defaulted from the experiment's client; see the module doc)."""
    pid = declared.get("partition-id")
    base = _configured_client(pid, node_id, configured)
    cid = declared.get("client-id") or (
        base.client_id if base is not None else f"partition-{pid}" if pid is not None else None
    )
    client_id = str(cid or f"node-{node_id}")
    who = f"node {node_id} (client {client_id})"
    if not shapes:
        raise FedLoraError(f"{who}: the server knows no modules to assign ranks to")
    explicit = any(k in declared for k in ("rank", "ranks", "rank-type"))
    if base is not None and not explicit:
        ranks = dict(base.ranks)
        for module, r in ranks.items():  # the configured ranks are checked like declared ones
            if module not in shapes or not 1 <= r <= min(shapes[module]):
                raise FedLoraError(f"{who}, module {module}: configured rank {r} does not fit")
        n = declared.get("num-examples")
        rslora = declared.get("rslora")
        return ClientSpec(
            client_id,
            ranks,
            float(declared.get("alpha", base.alpha)),
            base.rslora if rslora is None else str(rslora).lower() in ("1", "true", "yes"),
            base.num_examples if n is None else _int(n, "num-examples", who),
            base.resource_type,
        )
    if base is not None:
        default_alpha = base.alpha

    ranks = _declared_ranks(declared, shapes, who, rank_types, default_rank)
    alpha = float(declared.get("alpha", default_alpha))
    rslora_default = "true" if base is not None and base.rslora else "false"
    rslora = str(declared.get("rslora", rslora_default)).lower() in ("1", "true", "yes")
    n = declared.get("num-examples")
    if n is None and base is not None:
        n = base.num_examples
    rt = declared.get("rank-type")
    return ClientSpec(
        client_id,
        ranks,
        alpha,
        rslora,
        None if n is None else _int(n, "num-examples", who),
        None if rt is None else _int(rt, "rank-type", who),
    )


def simulation_node_configs(grid: Any) -> dict[int, dict[str, int]]:
    """The node configs of the virtual SuperNodes of Flower's simulation runtime, without
    asking them: node id -> ``{"partition-id": i}``; empty for any other runtime.

    In Flower 1.41's simulation runtime (``flwr-simulation``) the ServerApp's Grid is an
    ``InMemoryGrid`` over an in-memory link state that the runtime fills itself
    (``flwr.server.superlink.fleet.vce.vce_api._register_nodes``): virtual node ``i`` is the
    ``i``-th node created and gets node config ``partition-id = i`` (nothing else: a virtual
    node has no ``--node-config``). The link state keeps its nodes in creation order, so the
    order of ``state.get_node_info()`` is the partition order. Any other Grid (a deployment's
    SuperLink, a test double) gives ``{}``: its nodes are asked (``query.hello``).
    """
    if type(grid).__name__ != "InMemoryGrid" or not hasattr(grid, "state"):
        return {}
    try:
        ordered = [i.node_id for i in grid.state.get_node_info()]  # every node, in creation order
        online = set(grid.get_node_ids())
    except Exception:  # noqa: BLE001 - another Flower version: fall back to the hello
        return {}
    if not online <= set(ordered):  # not the simulation's node table: ask the nodes instead
        return {}
    return {node: {"partition-id": i} for i, node in enumerate(ordered) if node in online}
