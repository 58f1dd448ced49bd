"""fedlora.clients.base_weights: merges folded into float32 weights (originals kept on the CPU, only
for touched modules) or run as a frozen side branch on low-precision weights; both checked
against a float64 dense reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import llama_host, tiny_llama

from fedlora.clients.base_weights import BaseWeights, default_mode
from fedlora.clients.models import LoraHost, default_target_modules
from fedlora.core.contract import ClientSpec, LoraFactors, Payload


def factors(d_out: int, d_in: int, r: int, scale: float, seed: int) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), scale)


def reference(lin: torch.nn.Linear, w0: np.ndarray, f: LoraFactors, x: torch.Tensor):
    """x (W0 + s B A)^T + b in float64 numpy."""
    delta = f.scale * (f.B.double().numpy() @ f.A.double().numpy())
    out = x.double().numpy() @ (w0 + delta).T
    return out + lin.bias.detach().double().numpy() if lin.bias is not None else out


@pytest.mark.parametrize("mode", ["fold", "branch"])
def test_merge_matches_float64_reference_and_restores_bit_exactly(mode):
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 16)
    w0 = lin.weight.detach().clone()
    base = BaseWeights({"m": lin}, mode)
    f = factors(16, 24, 3, 0.1, seed=1)
    x = torch.randn(5, 24)
    base.apply({"m": f})
    with torch.no_grad():
        got = lin(x).double().numpy()
    np.testing.assert_allclose(got, reference(lin, w0.double().numpy(), f, x), atol=1e-5)
    if mode == "branch":
        assert torch.equal(lin.weight, w0)  # the weights are never touched
        assert not base._orig
    else:
        assert base._orig["m"].device.type == "cpu"  # the restore copy is not on the device
    base.apply({})
    assert torch.equal(lin.weight, w0) and not lin._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(lin(x), x @ w0.T + lin.bias, rtol=0, atol=0)


def test_fold_copies_only_touched_modules():
    host = llama_host()
    assert host.base.mode == "fold" and not host.base._orig
    m = host.module_names()[0]
    d_out, d_in = host.shapes()[m]
    host.prepare(ClientSpec("c", {m: 2}), Payload({m: factors(d_out, d_in, 2, 0.1, 3)}, None))
    assert list(host.base._orig) == [m]  # one CPU copy, of the merged module only


def test_bf16_weights_use_the_side_branch_and_keep_the_merge():
    """Folding a small merge into bf16 weights rounds most of it away; the branch computes it
    in float32 beside the untouched weights."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64).to(torch.bfloat16)
    w0 = lin.weight.detach().clone()
    assert default_mode({"m": lin}) == "branch"
    f = factors(64, 64, 2, 1e-4, seed=5)  # entries ~1e-4: below bf16's spacing at |W| ~ 0.06
    delta = f.scale * (f.B.double() @ f.A.double())
    folded = BaseWeights({"m": lin}, "fold")
    folded.apply({"m": f})
    kept = lin.weight.detach().double() - w0.double()
    assert float((kept - delta).norm()) > 0.3 * float(delta.norm())  # much of it rounded away
    folded.apply({})
    assert torch.equal(lin.weight, w0)
    branch = BaseWeights({"m": lin}, "branch")
    branch.apply({"m": f})
    (hook,) = lin._forward_hooks.values()
    x = torch.randn(8, 64)
    extra = hook(lin, (x,), torch.zeros(8, 64))  # the branch's own term, float32
    ref = x.double() @ delta.T
    assert float((extra.double() - ref).norm()) < 1e-5 * float(ref.norm())
    assert torch.equal(lin.weight, w0)


def test_host_on_bf16_model_trains_with_a_merge():
    model = tiny_llama().to(torch.bfloat16)
    host = LoraHost(model, default_target_modules(model))
    assert host.base.mode == "branch"
    m = host.module_names()[0]
    d_out, d_in = host.shapes()[m]
    merge = {m: factors(d_out, d_in, 2, 0.1, 3)}
    host.prepare(ClientSpec("c", {m: 2}), Payload(merge, None))
    for a, b, _ in host.lora_weights().values():
        assert a.dtype == b.dtype == torch.float32
    hooks = host._base[m]._forward_hooks  # the float32-output hook, then the merge's branch
    with host.use_global(None):
        assert len(hooks) == 1  # the global model has no client merge
    assert len(hooks) == 2  # ... and the client's is back
