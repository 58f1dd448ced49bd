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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ConfigRecord

from fedlora.contract import ClientSpec, FedLoraError

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


def resolve_spec(
    declared: Mapping[str, Any],
    node_id: int,
    shapes: Mapping[str, tuple[int, int]],
    *,
    rank_types: Sequence[int] = (),
    default_rank: int | None = None,
    default_alpha: float = 16.0,
) -> ClientSpec:
    """The `ClientSpec` of a node from its declared config, validated against `shapes`."""
    pid = declared.get("partition-id")
    cid = declared.get("client-id") or (f"partition-{pid}" if pid is not None else None)
    client_id = str(cid or f"node-{node_id}")
    who = f"node {node_id} (client {client_id})"
    if not shapes:
        raise FedLoraError(f"{who}: the server knows no modules to assign ranks to")

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
    alpha = float(declared.get("alpha", default_alpha))
    rslora = str(declared.get("rslora", "false")).lower() in ("1", "true", "yes")
    n = declared.get("num-examples")
    rt = declared.get("rank-type")
    return ClientSpec(
        client_id,
        ranks,
        alpha,
        rslora,
        None if n is None else _int(n, "num-examples", who),
        None if rt is None else _int(rt, "rank-type", who),
    )
