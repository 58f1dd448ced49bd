"""fedlora.clients.device: device resolution (availability monkeypatched: nothing runs on a
GPU here), precision and dtype policy, and the engine refusing an unavailable device before
loading."""

from __future__ import annotations

import pytest
import torch

from fedlora.clients import device as D
from fedlora.core.contract import FedLoraError
from fedlora.federation.config import ConfigError, load_config


@pytest.fixture
def cuda(monkeypatch):
    """torch reports two CUDA devices (never used: only resolution is tested)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, no_accelerator):
    assert D.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert D.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert D.resolve_device("auto") == torch.device("cuda", 0)


def test_explicit_cuda_devices(cuda):
    assert D.resolve_device("cuda") == torch.device("cuda", 0)
    assert D.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(FedLoraError, match=r"train.device = 'cuda:2': only 2 CUDA device"):
        D.resolve_device("cuda:2")
    assert D.resolve_precision("auto", torch.device("cuda", 1)) == torch.bfloat16


def test_unavailable_devices_are_refused_by_name(no_accelerator):
    for name in ("cuda", "cuda:0"):
        with pytest.raises(FedLoraError, match=rf"train.device = '{name}': torch sees no CUDA"):
            D.resolve_device(name)
    with pytest.raises(FedLoraError, match="train.device = 'mps'"):
        D.resolve_device("mps")
    with pytest.raises(FedLoraError, match="train.device = 'gpu'"):
        D.resolve_device("gpu")
    assert D.resolve_device("cpu") == torch.device("cpu")


def test_precision_and_dtype_policy(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(D, "native_bf16", lambda device: False)
    assert D.resolve_precision("auto", cpu) == torch.float32
    monkeypatch.setattr(D, "native_bf16", lambda device: True)
    assert D.resolve_precision("auto", cpu) == torch.bfloat16
    assert D.resolve_precision("fp16", cpu) == torch.float16
    assert D.resolve_precision("fp32", cpu) == torch.float32
    assert D.resolve_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert D.resolve_dtype("float32", torch.bfloat16) == torch.float32
    with pytest.raises(FedLoraError, match="train.precision = 'int8'"):
        D.resolve_precision("int8", cpu)
    with pytest.raises(FedLoraError, match="model.dtype = 'double'"):
        D.resolve_dtype("double", torch.float32)
    assert not D.Amp(cpu, torch.bfloat16).scaler().is_enabled()
    assert D.Amp(cpu, torch.float16).scaler().is_enabled()  # fp16 scales its gradients


def test_amp_autocasts_matmuls_only_when_asked():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with D.Amp(torch.device("cpu"), torch.bfloat16).autocast():
        assert (x @ w).dtype == torch.bfloat16
        assert (x.double() @ w.double()).dtype == torch.float64  # float64 is left alone
    with D.Amp(torch.device("cpu")).autocast():
        assert (x @ w).dtype == torch.float32


def test_config_checks_device_spelling_and_engine_refuses_before_loading(
    tmp_path, monkeypatch, no_accelerator
):
    with pytest.raises(ConfigError, match="train.device = 'gpu0'"):
        load_config("tiny", {"train.device": "gpu0"})
    cfg = load_config("tiny", {"train.device": "cuda:0", "output_dir": str(tmp_path)})
    from fedlora.engine import runner
    from fedlora.federation import build

    def no_loading(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("data or model loaded before the device was checked")

    monkeypatch.setattr(build, "load_data", no_loading)
    monkeypatch.setattr(build, "load_base_model", no_loading)
    with pytest.raises(FedLoraError, match="train.device = 'cuda:0'"):
        runner.run_experiment(cfg, progress=False)


def test_16_bit_weights_without_autocast_are_refused_before_loading(tmp_path, monkeypatch):
    """bf16 weights with fp32 precision would compute in bf16 without autocast, where the LoRA
    term's sum is rounded in bf16: refused by name; with bf16 autocast it is accepted."""
    from fedlora.engine import runner
    from fedlora.federation import build

    def no_loading(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("data or model loaded before the dtype was checked")

    monkeypatch.setattr(build, "load_data", no_loading)
    cfg = load_config("tiny", {"model.dtype": "bfloat16", "train.precision": "fp32",
                               "output_dir": str(tmp_path)})  # fmt: skip
    with pytest.raises(ConfigError, match="model.dtype = 'bfloat16' needs mixed precision.*"
                       "train.precision = 'fp32'"):  # fmt: skip
        runner.run_experiment(cfg, progress=False)
    ok = build.placement(load_config("tiny", {"model.dtype": "bfloat16",
                                               "train.precision": "bf16"}))  # fmt: skip
    assert (ok.compute, ok.storage) == (torch.bfloat16, torch.bfloat16)


def test_load_model_places_a_quantized_model_on_the_current_cuda_index(cuda, monkeypatch):
    """transformers' device_map needs a CUDA index: load_model resolves plain "cuda" to the
    current device (a None index crashed inside transformers on a GPU)."""
    import transformers

    from fedlora.clients import models

    seen = {}

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(models, "quantization_config", lambda *a: "4bit config")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    for device, index in (("cuda", 1), ("cuda:0", 0), (torch.device("cuda", 1), 1)):
        with pytest.raises(RuntimeError, match="stop before loading"):
            models.load_model("some/model", device=device, quantization="4bit")
        assert seen["device_map"] == {"": index} and seen["quantization_config"] == "4bit config"
