"""A bitsandbytes-quantized base (QLoRA): the error paths always; loading, training and exact
merges on bitsandbytes' CPU backend where the package is installed (``fedlora[quant]``)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from fedlora.clients.models import LoraHost, default_target_modules, load_model, quantization_config
from fedlora.clients.tiny import build_tiny
from fedlora.clients.train import TrainConfig, train_client
from fedlora.core.contract import ClientSpec, FedLoraError, LoraFactors, Payload


def test_missing_bitsandbytes_names_the_key_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(FedLoraError, match=r"quantization = '4bit' needs bitsandbytes.*quant"):
        quantization_config("4bit", torch.float32, torch.device("cpu"))


def test_no_backend_and_unknown_mode_are_refused():
    with pytest.raises(FedLoraError, match="model.quantization = '8bit': bitsandbytes has no mps"):
        quantization_config("8bit", torch.float32, torch.device("mps"))
    with pytest.raises(FedLoraError, match="model.quantization = '2bit'"):
        quantization_config("2bit", torch.float32, torch.device("cpu"))
    assert quantization_config("none", torch.float32, torch.device("mps")) is None


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tok = build_tiny("tiny-llama", hidden=64)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def lm_examples(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": ids, "labels": [-100] + ids[1:]}
        for ids in (torch.randint(4, 250, (9,), generator=g).tolist() for _ in range(n))
    ]


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantized_base_trains_and_returns_cpu_float32(saved_tiny, mode):
    import bitsandbytes as bnb

    model, _ = load_model(saved_tiny, quantization=mode, compute_dtype=torch.float32)
    targets = default_target_modules(model)
    kind = bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    assert all(isinstance(model.get_submodule(m), kind) for m in targets)
    host = LoraHost(model, targets)
    assert host.base.mode == "branch"
    spec = ClientSpec("q", {m: 4 for m in targets})
    u = train_client(host, spec, Payload(None, None), lm_examples(), TrainConfig(local_steps=3))
    assert np.isfinite(u.extras["last_loss"])
    f = next(iter(u.adapter.values()))
    assert f.A.dtype == torch.float32 and f.A.device.type == "cpu"
    assert float(f.B.abs().sum()) > 0  # B moved from its zero init
    with pytest.raises(FedLoraError, match="model.save_merged: the base model is quantized"):
        host.merge_and_save({}, "unused")


def test_merge_on_a_4bit_base_is_exact(saved_tiny):
    """FLoRA / FedEx-LoRA merges on a quantized base run as a side branch: the output moves by
    exactly x (s B A)^T (float64 reference) and the 4-bit weights are not requantized."""
    model, _ = load_model(saved_tiny, quantization="4bit", compute_dtype=torch.float32)
    host = LoraHost(model, default_target_modules(model))
    m = "model.layers.0.mlp.down_proj"
    lin = host._base[m]
    d_out, d_in = host.shapes()[m]
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, d_in, generator=g), torch.randn(d_out, 3, generator=g)
    merge = {m: LoraFactors(a, b, 0.01)}
    x = torch.randn(5, d_in, generator=g)
    host.prepare(ClientSpec("c", {m: 2}), Payload(None, None))
    with torch.no_grad():
        plain = lin(x).double()  # the 4-bit layer alone (the CPU backend repacks on first use)
    packed = lin.weight.data.clone()
    host.prepare(ClientSpec("c", {m: 2}), Payload(merge, None))
    with torch.no_grad():
        merged = lin(x).double()
    ref = x.double() @ merge[m].delta().T
    assert float((merged - plain - ref).norm()) < 1e-5 * float(ref.norm())
    assert torch.equal(lin.weight.data, packed)  # the quantized weights are untouched


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_a_quantized_base_has_the_norm_of_its_weights(saved_tiny, mode):
    """The first-round lone bound follows the base weights' norm (issue 27): read back from
    the quantized layout, it is the float model's within the quantization error."""
    full, _ = load_model(saved_tiny, quantization="none", compute_dtype=torch.float32)
    quant, _ = load_model(saved_tiny, quantization=mode, compute_dtype=torch.float32)
    targets = default_target_modules(full)
    ref = LoraHost(full, targets).base_norm()
    got = LoraHost(quant, targets).base_norm()
    assert ref > 0 and abs(got - ref) / ref < 0.05, (got, ref)
