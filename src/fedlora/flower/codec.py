"""Exact encoding of fedlora's `Payload`, `ClientUpdate` and `ClientSpec` as Flower records.

Layout of one message's `RecordDict` (keys prefixed ``fedlora.``):

* ``fedlora.meta`` (`ConfigRecord`): one JSON string ``"json"`` with the structure: kind,
  trainable, seed, client id, num_examples, the module names and LoRA scales of each adapter
  (floats via ``repr``: exact), and ``extras`` with every tensor replaced by a reference.
* ``fedlora.merge`` / ``fedlora.adapter`` (`ArrayRecord`): every module's A, flattened and
  concatenated module after module, in one array per dtype (``A:float32``), and the same for B
  (``B:float32``); each module's shapes (rank-0 factors are (0, d_in) / (d_out, 0)) and dtypes
  are in the meta JSON. bfloat16, which numpy lacks, travels bit-for-bit as int16 and is
  viewed back.
* ``fedlora.dense`` (`ArrayRecord`): the dense tensors (a classifier head) by parameter name,
  their names and dtypes in the meta JSON's ``"dense"``.
* ``fedlora.extras`` (`ArrayRecord`): tensors found anywhere in ``extras`` (LoRA-A2's slot
  indices, budgets sent as tensors, ...), by number.
* ``fedlora.metrics`` (`MetricRecord`, updates only): the update's top-level float extras
  (training metrics) and ``num-examples``, so Flower's own tooling can read them.

What is sent is what is encoded: both factors of every module, also a frozen one (FFA-LoRA's
A, LoRA-A2's frozen factor). `record_nbytes` reports the encoded size; the contract's
`update_nbytes(update, trainable)` is the smaller figure a client that omitted frozen factors
would send.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora.core.contract import (
    Adapter,
    ClientSpec,
    ClientUpdate,
    FedLoraError,
    LoraFactors,
    Payload,
)

META, MERGE, ADAPTER, EXTRAS, METRICS, DENSE = (
    "fedlora.meta",
    "fedlora.merge",
    "fedlora.adapter",
    "fedlora.extras",
    "fedlora.metrics",
    "fedlora.dense",
)
SPEC, NODE = "fedlora.spec", "fedlora.node"
# a reply's node-side counters (model builds of this node in this run, load seconds)
NODE_METRICS = "fedlora.node-metrics"
# where a reply was computed: host name, process id and, in a Ray actor, the Ray node id
NODE_PLACE = "fedlora.node-place"

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


class CodecError(FedLoraError):
    """A record that cannot be decoded into fedlora objects."""


# -- tensors --------------------------------------------------------------------------------


def _put(record: ArrayRecord, key: str, t: torch.Tensor) -> str:
    """Store `t` under `key`; returns its dtype name (bfloat16 travels as int16 bits)."""
    t = t.detach().cpu()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise CodecError(f"cannot encode tensor {key!r} of dtype {t.dtype}")
    if t.dtype == torch.bfloat16:
        t = t.contiguous().view(torch.int16)
    record[key] = Array(t.contiguous())
    return name


def _get(record: ArrayRecord, key: str, dtype: str) -> torch.Tensor:
    if key not in record:
        raise CodecError(f"missing array {key!r}")
    t = torch.from_numpy(record[key].numpy().copy())
    if dtype == "bfloat16":
        return t.view(torch.bfloat16)
    if dtype not in _DTYPES:
        raise CodecError(f"array {key!r}: unknown dtype {dtype!r}")
    if t.dtype != _DTYPES[dtype]:
        raise CodecError(f"array {key!r}: dtype {t.dtype}, expected {dtype}")
    return t


def _encode_adapter(adapter: Adapter | None, record: ArrayRecord) -> dict | None:
    """Pack an adapter's factors into one flat array per factor and dtype (``A:float32``,
    ``B:float32``, ...), module after module; the modules, shapes, dtypes and scales go to the
    meta JSON. Why packed: Flower sends every array of a record as its own content-hashed
    object (5 MiB chunks), pushed and pulled one by one over the SuperLink; a SmolLM2 adapter
    kept one array per factor was 845 objects per message, packed it is a handful."""
    if adapter is None:
        return None
    modules, scales, dtypes, shapes = [], [], [], []
    flats: dict[str, list[torch.Tensor]] = {}
    for module, f in adapter.items():
        if not isinstance(f, LoraFactors):
            raise CodecError(f"module {module}: expected LoraFactors, got {type(f).__name__}")
        modules.append(module)
        scales.append(float(f.scale))
        pair = []
        for factor, t in (("A", f.A), ("B", f.B)):
            t = t.detach().cpu()
            name = str(t.dtype).removeprefix("torch.")
            flats.setdefault(f"{factor}:{name}", []).append(t.reshape(-1))
            pair.append(name)
        dtypes.append(pair)
        shapes.append([list(f.A.shape), list(f.B.shape)])
    for key, parts in flats.items():
        _put(record, key, torch.cat(parts) if len(parts) > 1 else parts[0])
    return {"modules": modules, "scales": scales, "dtypes": dtypes, "shapes": shapes}


def _decode_adapter(meta: dict | None, record: ArrayRecord | None) -> Adapter | None:
    if meta is None:
        return None
    if record is None:
        raise CodecError("adapter arrays are missing")
    if "shapes" not in meta:
        raise CodecError("adapter record in an older layout (one array per factor): the "
                         "server and this node run different fedlora versions")  # fmt: skip
    offsets: dict[str, int] = {}
    flats: dict[str, torch.Tensor] = {}

    def take(factor: str, dtype: str, shape: list[int], module: str) -> torch.Tensor:
        key = f"{factor}:{dtype}"
        if key not in flats:
            flats[key] = _get(record, key, dtype)
        start, n = offsets.get(key, 0), math.prod(shape)
        if start + n > flats[key].numel():
            raise CodecError(f"module {module}: array {key!r} ends before its {factor}")
        offsets[key] = start + n
        return flats[key][start : start + n].view(shape)

    out: Adapter = {}
    for module, scale, (da, db), (sa, sb) in zip(
        meta["modules"], meta["scales"], meta["dtypes"], meta["shapes"]
    ):
        out[module] = LoraFactors(
            take("A", da, sa, module), take("B", db, sb, module), float(scale)
        )
    for key, used in offsets.items():
        if used != flats[key].numel():
            raise CodecError(f"array {key!r}: {flats[key].numel() - used} values left over")
    return out


def _encode_dense(dense: Mapping[str, torch.Tensor], record: ArrayRecord) -> dict:
    names = list(dense)
    return {"names": names, "dtypes": [_put(record, name, dense[name]) for name in names]}


def _decode_dense(meta: dict | None, record: ArrayRecord | None) -> dict[str, torch.Tensor]:
    if not meta or not meta["names"]:
        return {}
    if record is None:
        raise CodecError("dense arrays are missing")
    return {name: _get(record, name, dt) for name, dt in zip(meta["names"], meta["dtypes"])}


# -- extras: JSON structure with tensor references ------------------------------------------


def _encode_value(x: Any, record: ArrayRecord, path: str) -> Any:
    if isinstance(x, torch.Tensor):
        key = str(len(record))
        return {"__tensor__": key, "dtype": _put(record, key, x)}
    if isinstance(x, Mapping):
        items = []
        for k, v in x.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise CodecError(f"extras{path}: keys must be str or int, got {k!r}")
            items.append([k, _encode_value(v, record, f"{path}[{k!r}]")])
        return {"__dict__": items}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode_value(v, record, f"{path}[{i}]") for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [_encode_value(v, record, f"{path}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, (frozenset, set)):
        return {"__set__": sorted(x), "frozen": isinstance(x, frozenset)}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if hasattr(x, "item") and callable(x.item):  # numpy scalar
        return x.item()
    raise CodecError(f"extras{path}: cannot encode a {type(x).__name__}")


def _decode_value(x: Any, record: ArrayRecord | None) -> Any:
    if isinstance(x, list):
        return [_decode_value(v, record) for v in x]
    if isinstance(x, dict):
        if "__tensor__" in x:
            if record is None:
                raise CodecError("extras arrays are missing")
            return _get(record, x["__tensor__"], x["dtype"])
        if "__dict__" in x:
            return {k: _decode_value(v, record) for k, v in x["__dict__"]}
        if "__tuple__" in x:
            return tuple(_decode_value(v, record) for v in x["__tuple__"])
        if "__set__" in x:
            return (frozenset if x["frozen"] else set)(x["__set__"])
        raise CodecError(f"malformed extras entry {sorted(x)}")
    return x


def _dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=True, separators=(",", ":"))


def _meta(content: RecordDict, kind: str) -> dict:
    if META not in content.config_records:
        raise CodecError(f"not a fedlora {kind}: no {META!r} record")
    try:
        meta = json.loads(content.config_records[META]["json"])
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"malformed {META!r} record: {e}") from None
    if not isinstance(meta, dict):
        raise CodecError(f"malformed {META!r} record: a {type(meta).__name__}, not an object")
    if meta.get("kind") != kind:
        raise CodecError(f"expected a fedlora {kind}, got {meta.get('kind')!r}")
    return meta


# -- payloads and updates ---------------------------------------------------------------------


def encode_payload(payload: Payload) -> RecordDict:
    """The `RecordDict` of a `Payload` (decoded exactly by `decode_payload`)."""
    merge, adapter, extras, dense = ArrayRecord(), ArrayRecord(), ArrayRecord(), ArrayRecord()
    meta = {
        "kind": "payload",
        "trainable": sorted(payload.trainable),
        "seed": int(payload.seed),
        "merge": _encode_adapter(payload.merge, merge),
        "adapter": _encode_adapter(payload.adapter, adapter),
        "dense": _encode_dense(payload.dense or {}, dense),
        "extras": _encode_value(payload.extras, extras, ""),
    }
    return RecordDict(
        {
            META: ConfigRecord({"json": _dumps(meta)}),
            MERGE: merge,
            ADAPTER: adapter,
            DENSE: dense,
            EXTRAS: extras,
        }
    )


def decode_payload(content: RecordDict) -> Payload:
    meta = _meta(content, "payload")
    arrays = content.array_records
    return Payload(
        merge=_decode_adapter(meta["merge"], arrays.get(MERGE)),
        adapter=_decode_adapter(meta["adapter"], arrays.get(ADAPTER)),
        trainable=frozenset(meta["trainable"]),
        seed=int(meta["seed"]),
        extras=_decode_value(meta["extras"], arrays.get(EXTRAS)),
        dense=_decode_dense(meta.get("dense"), arrays.get(DENSE)),
    )


def _is_metric(v: Any) -> bool:
    return isinstance(v, float)


def encode_update(update: ClientUpdate) -> RecordDict:
    """The `RecordDict` of a `ClientUpdate`; float extras also go to a `MetricRecord`."""
    adapter, extras, dense = ArrayRecord(), ArrayRecord(), ArrayRecord()
    metrics = {k: v for k, v in update.extras.items() if _is_metric(v)}
    rest = {k: v for k, v in update.extras.items() if k not in metrics}
    meta = {
        "kind": "update",
        "client_id": update.client_id,
        "num_examples": update.num_examples,
        "adapter": _encode_adapter(update.adapter, adapter),
        "dense": _encode_dense(update.dense or {}, dense),
        "extras": _encode_value(rest, extras, ""),
        "metrics": list(metrics),
    }
    mr = MetricRecord({k: float(v) for k, v in metrics.items()})
    if isinstance(update.num_examples, int) and not isinstance(update.num_examples, bool):
        mr["num-examples"] = update.num_examples
    return RecordDict(
        {
            META: ConfigRecord({"json": _dumps(meta)}),
            ADAPTER: adapter,
            DENSE: dense,
            EXTRAS: extras,
            METRICS: mr,
        }
    )


def decode_update(content: RecordDict) -> ClientUpdate:
    meta = _meta(content, "update")
    arrays = content.array_records
    extras = _decode_value(meta["extras"], arrays.get(EXTRAS))
    if meta["metrics"]:
        mr = content.metric_records.get(METRICS)
        if mr is None:
            raise CodecError(f"missing {METRICS!r} record")
        for k in meta["metrics"]:
            extras[k] = float(mr[k])
    return ClientUpdate(
        client_id=meta["client_id"],
        adapter=_decode_adapter(meta["adapter"], arrays.get(ADAPTER)) or {},
        num_examples=meta["num_examples"],
        extras=extras,
        dense=_decode_dense(meta.get("dense"), arrays.get(DENSE)),
    )


# -- client specs -----------------------------------------------------------------------------


def encode_spec(spec: ClientSpec) -> ConfigRecord:
    """A resolved `ClientSpec` (what the server hands a node with its payload)."""
    return ConfigRecord(
        {
            "json": _dumps(
                {
                    "client_id": spec.client_id,
                    "ranks": dict(spec.ranks),
                    "alpha": dict(spec.alpha) if isinstance(spec.alpha, Mapping) else spec.alpha,
                    "rslora": spec.rslora,
                    "num_examples": spec.num_examples,
                    "resource_type": spec.resource_type,
                }
            )
        }
    )


def decode_spec(record: ConfigRecord) -> ClientSpec:
    d = json.loads(record["json"])
    return ClientSpec(
        d["client_id"],
        d["ranks"],
        d["alpha"],
        d["rslora"],
        d["num_examples"],
        d["resource_type"],
    )


# -- sizes ------------------------------------------------------------------------------------


def record_nbytes(content: RecordDict) -> int:
    """Bytes of a `RecordDict` as Flower counts them (arrays, configs and metrics)."""
    n = 0
    for rec in content.values():
        n += rec.count_bytes()
    return n


def adapter_to_arrays(adapter: Adapter) -> ArrayRecord:
    """Scale-1 factors (a global delta) as a bare ArrayRecord: ``A/<module>``, ``B/<module>``."""
    record = ArrayRecord()
    for module, f in adapter.items():
        if f.scale != 1.0:
            raise CodecError(f"module {module}: adapter_to_arrays needs scale 1, got {f.scale}")
        if f.A.dtype == torch.bfloat16 or f.B.dtype == torch.bfloat16:
            raise CodecError(f"module {module}: bfloat16 needs encode_payload")
        _put(record, f"A/{module}", f.A)
        _put(record, f"B/{module}", f.B)
    return record


def arrays_to_adapter(record: ArrayRecord) -> Adapter:
    """Inverse of `adapter_to_arrays`."""
    out: Adapter = {}
    for key in record:
        if key.startswith("A/"):
            module = key[2:]
            A = torch.from_numpy(record[key].numpy().copy())
            B = torch.from_numpy(record[f"B/{module}"].numpy().copy())
            out[module] = LoraFactors(A, B, 1.0)
    return out
