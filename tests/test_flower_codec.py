"""The Flower codec round-trips payloads, updates and specs exactly, through protobuf."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from flower_grid import wire  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedlora.core.contract import (  # noqa: E402
    ClientSpec,
    ClientUpdate,
    LoraFactors,
    Payload,
    payload_nbytes,
    update_nbytes,
)
from fedlora.flower import codec  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]




def _same(x, y):
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor)
        assert x.dtype == y.dtype and x.shape == y.shape
        if x.numel():
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
    elif isinstance(x, LoraFactors):
        _same(x.A, y.A)
        _same(x.B, y.B)
        assert x.scale == y.scale or (x.scale != x.scale and y.scale != y.scale)
    elif isinstance(x, dict):
        assert list(x) == list(y)
        for k in x:
            _same(x[k], y[k])
    elif isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y)
        for a, b in zip(x, y):
            _same(a, b)
    elif isinstance(x, float) and x != x:
        assert y != y
    else:
        assert x == y and type(x) is type(y)


@st.composite
def adapters(draw, allow_none=True):
    if allow_none and draw(st.booleans()):
        return None
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(draw(st.integers(0, 3))):
        d_out, d_in = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        r = draw(st.integers(0, 4))  # rank 0 included
        dt = draw(st.sampled_from(DTYPES))
        A = torch.randn(r, d_in, generator=g).to(dt)
        B = torch.randn(d_out, r, generator=g).to(dt)
        scale = draw(st.floats(allow_nan=False, width=64))
        out[f"model.layers.{i}.self_attn.q_proj"] = LoraFactors(A, B, scale)
    return out


@st.composite
def dense_tensors(draw):
    """A dense head: parameter name -> tensor of any float dtype (maybe none at all)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    out = {}
    for name in draw(st.lists(st.sampled_from(["classifier.weight", "classifier.bias"]))):
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))
        out[name] = torch.randn(shape, generator=g).to(draw(st.sampled_from(DTYPES)))
    return out


@settings(max_examples=40, deadline=None)
@given(
    dense=dense_tensors(),
    merge=adapters(),
    adapter=adapters(),
    trainable=st.sampled_from([frozenset({"A", "B"}), frozenset({"A"}), frozenset({"B"})]),
    seed=st.integers(0, 2**62),
    budget=st.integers(0, 100),
    gamma=st.floats(0.01, 1.0),
)
def test_payload_round_trip(dense, merge, adapter, trainable, seed, budget, gamma):
    extras = {
        "budget": budget,
        "budget_t": torch.tensor(budget),
        "hetlora": {
            "gamma": gamma,
            "lambda": 0.1,
            "prev_tail_norms": {"m": 0.5, "n": float("inf")},
        },
        "tuple": (1, "x", None, True),
    }
    p = Payload(merge, adapter, trainable, seed, extras, dense)
    content = codec.encode_payload(p)
    q = codec.decode_payload(wire(content))
    _same(p.dense, q.dense)
    _same(p.merge, q.merge)
    _same(p.adapter, q.adapter)
    assert q.trainable == p.trainable and q.seed == p.seed
    _same(p.extras, q.extras)
    assert codec.record_nbytes(content) >= payload_nbytes(p)


@settings(max_examples=40, deadline=None)
@given(
    adapter=adapters(allow_none=False),
    n=st.integers(1, 10**9),
    loss=st.floats(width=64),
    dense=dense_tensors(),
)
def test_update_round_trip(adapter, n, loss, dense):
    slots = {m: torch.randperm(8)[: f.rank].sort().values for m, f in adapter.items()}
    u = ClientUpdate(
        "client-7",
        adapter,
        n,
        {
            "train_loss": loss,
            "slots": slots,
            "hetlora_tail_norms": {m: 0.25 for m in adapter},
            "steps": 3,
        },
        dense,
    )
    content = codec.encode_update(u)
    v = codec.decode_update(wire(content))
    assert v.client_id == u.client_id and v.num_examples == n
    _same(u.dense, v.dense)
    assert codec.record_nbytes(content) >= update_nbytes(u)
    _same(u.adapter, v.adapter)
    assert set(v.extras) == set(u.extras)
    for k in u.extras:
        _same(u.extras[k], v.extras[k])
    for m in slots:
        assert v.extras["slots"][m].dtype == torch.long


def test_metrics_visible_to_flower():
    u = ClientUpdate("c", {}, 12, {"train_loss": 0.5})
    content = codec.encode_update(u)
    assert dict(content.metric_records[codec.METRICS]) == {"train_loss": 0.5, "num-examples": 12}


def test_spec_round_trip():
    for spec in (
        ClientSpec("a", {"q": 4, "v": 2}),
        ClientSpec("b", {"q": 1}, alpha={"q": 8.0}, rslora=True, num_examples=5, resource_type=3),
    ):
        assert codec.decode_spec(_wire_config(codec.encode_spec(spec))) == spec


def _wire_config(cfg):
    from flwr.app import RecordDict

    return wire(RecordDict({"s": cfg}))["s"]


def test_global_arrays_round_trip():
    g = torch.Generator().manual_seed(0)
    delta = {
        "m": LoraFactors(
            torch.randn(3, 5, generator=g, dtype=torch.float64),
            torch.randn(4, 3, generator=g, dtype=torch.float64),
            1.0,
        ),
        "z": LoraFactors(torch.zeros(0, 5), torch.zeros(4, 0), 1.0),
    }
    back = codec.arrays_to_adapter(wire(_rd(codec.adapter_to_arrays(delta)))["a"])
    _same(delta, back)


def _rd(arrays):
    from flwr.app import RecordDict

    return RecordDict({"a": arrays})


def test_bad_records_raise_codec_error():
    from flwr.app import RecordDict

    with pytest.raises(codec.CodecError, match="no 'fedlora.meta'"):
        codec.decode_update(RecordDict())
    content = codec.encode_payload(Payload(None, None))
    with pytest.raises(codec.CodecError, match="expected a fedlora update"):
        codec.decode_update(content)
    with pytest.raises(codec.CodecError, match="cannot encode"):
        codec.encode_payload(Payload(None, None, extras={"x": object()}))


def test_adapter_factors_travel_packed_one_array_per_factor_and_dtype():
    """A 30-module adapter is 2 arrays on the wire (Flower sends each array as its own object),
    mixed dtypes one more per dtype; a short or long packed array, and the old one-array-per-
    factor layout, are refused by name."""
    import json

    g = torch.Generator().manual_seed(0)
    ad = {
        f"m{i}": LoraFactors(torch.randn(i % 4, 5, generator=g), torch.randn(3, i % 4, generator=g))
        for i in range(30)
    }
    content = codec.encode_update(ClientUpdate("c", ad, 7))
    assert sorted(content.array_records[codec.ADAPTER]) == ["A:float32", "B:float32"]
    _same(codec.decode_update(wire(content)).adapter, ad)
    ad["m1"] = LoraFactors(ad["m1"].A.to(torch.bfloat16), ad["m1"].B)
    mixed = codec.encode_update(ClientUpdate("c", ad, 7))
    assert sorted(mixed.array_records[codec.ADAPTER]) == ["A:bfloat16", "A:float32", "B:float32"]
    _same(codec.decode_update(wire(mixed)).adapter, ad)

    from flwr.app import Array

    short = codec.encode_update(ClientUpdate("c", ad, 7))
    flat = short.array_records[codec.ADAPTER]["B:float32"].numpy()
    short.array_records[codec.ADAPTER]["B:float32"] = Array(flat[:-1].copy())
    with pytest.raises(codec.CodecError, match="module m29: array 'B:float32' ends before"):
        codec.decode_update(short)
    long = codec.encode_update(ClientUpdate("c", ad, 7))
    long.array_records[codec.ADAPTER]["A:float32"] = Array(
        torch.cat([ad[m].A.float().reshape(-1) for m in ad if m != "m1"] + [torch.ones(2)]).numpy()
    )
    with pytest.raises(codec.CodecError, match="'A:float32': 2 values left over"):
        codec.decode_update(long)
    old = codec.encode_update(ClientUpdate("c", ad, 7))
    meta = json.loads(old.config_records[codec.META]["json"])
    del meta["adapter"]["shapes"]
    old.config_records[codec.META]["json"] = json.dumps(meta)
    with pytest.raises(codec.CodecError, match="older layout"):
        codec.decode_update(old)
