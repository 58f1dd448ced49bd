"""Where and in what precision a client computes: device, autocast and weight dtype.

Device and precision stay inside the client (see DESIGN.md): the base model, batches and the
active LoRA factors live on the resolved device; payloads and updates cross the client
boundary as CPU float32 factors, so strategies never see a device.

* `resolve_device`: ``"auto"`` (cuda if torch reports one, else mps, else cpu) or an explicit
  ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``; a device torch cannot use is refused by name.
* `resolve_precision`: the autocast dtype of ``"fp32"`` (none), ``"bf16"``, ``"fp16"``, or
  ``"auto"`` (bf16 where the device computes it natively, else fp32).
* `resolve_dtype`: the storage dtype of the base weights; ``"auto"`` follows the precision
  (bf16 autocast -> bfloat16 weights: measured faster on CPU and half the memory).
* `Amp`: the autocast context and, for fp16, the gradient scaler of one client's training.
* `float32_outputs`: under autocast, the LoRA target modules' outputs come out in float32, so
  the adapter's small term is added to them in float32 rather than rounded away in bf16.

Torch only.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from fedlora.core.contract import FedLoraError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto", key: str = "train.device") -> torch.device:
    """The torch device for `name` (see the module docstring); raises `FedLoraError` naming
    `key` when the device does not exist here, before anything is loaded."""
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise FedLoraError(f"{key} = {name!r}: choose 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FedLoraError(
                f"{key} = {name!r}: torch sees no CUDA device here (torch {torch.__version__}); "
                "use 'auto' or 'cpu', or install a CUDA build of torch"
            )
        index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            raise FedLoraError(
                f"{key} = {name!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})"
            )
        return torch.device("cuda", index)
    if name == "mps" and not torch.backends.mps.is_available():
        raise FedLoraError(f"{key} = 'mps': torch reports no Apple MPS device here; use 'auto'")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively (CUDA with bf16 support; a CPU with
    AVX512-BF16 or AMX units, as oneDNN reports it)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
            return False
    return False  # mps: bf16 support depends on the macOS version; auto stays fp32 there


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of `precision` on `device` (float32: no autocast)."""
    if precision not in PRECISIONS:
        raise FedLoraError(f"train.precision = {precision!r}: choose one of {PRECISIONS}")
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return _PRECISION_DTYPE[precision]


def resolve_dtype(dtype: str, compute: torch.dtype) -> torch.dtype:
    """The storage dtype of the base weights; ``"auto"``: the compute dtype."""
    if dtype not in DTYPES:
        raise FedLoraError(f"model.dtype = {dtype!r}: choose one of {DTYPES}")
    return compute if dtype == "auto" else _DTYPE[dtype]


def precision_name(dtype: torch.dtype) -> str:
    """``"fp32"`` / ``"bf16"`` / ``"fp16"`` of a compute dtype."""
    return {v: k for k, v in _PRECISION_DTYPE.items()}[dtype]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (cpu for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")  # pragma: no cover


@dataclass(frozen=True)
class Amp:
    """Mixed precision of one client on one device: ``compute`` is the autocast dtype
    (float32: autocast off). fp16 needs a gradient scaler (`scaler`); bf16 has fp32's range
    and does not. Trainable LoRA factors and the optimizer state stay float32 either way."""

    device: torch.device
    compute: torch.dtype = torch.float32

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.compute == torch.float32:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.compute):
            yield

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled for fp16 only (a pass-through otherwise)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.compute == torch.float16)

    @classmethod
    def of(cls, model: torch.nn.Module, precision: str) -> Amp:
        """The `Amp` of `precision` on the device `model` lives on."""
        device = model_device(model)
        return cls(device, resolve_precision(precision, device))


def float32_layer_norms(model: torch.nn.Module) -> int:
    """Keep every ``nn.LayerNorm`` of a 16-bit model in float32; returns how many.

    Why: under autocast the LoRA targets' outputs are float32 (`float32_outputs`), and an
    encoder adds them to its residual stream right before a LayerNorm (BERT's
    ``output.dense`` -> ``LayerNorm``). CPU ``layer_norm`` accepts a float32 or bf16 input
    with float32 weights, but refuses a float32 input with bf16 weights ("mixed dtype (CPU)"),
    so a bf16 encoder could neither train nor evaluate. Norm weights are a few thousand
    numbers: keeping them float32 costs nothing and is what mixed precision does anyway.
    Llama-style RMSNorms compute in float32 internally and are left as they are.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm) and any(
            p.dtype != torch.float32 for p in module.parameters(recurse=False)
        ):
            module.float()
            n += 1
    return n


def _upcast_output(module: torch.nn.Module, inputs: tuple, output: torch.Tensor):
    if output.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(
        output.device.type
    ):
        return output.float()
    return None  # fp32 (or no autocast): the output is left as it is, bit for bit


def float32_outputs(modules: Iterable[torch.nn.Module]) -> list:
    """Forward hooks making each module's output float32 whenever autocast produced it in a
    16-bit dtype; returns the hook handles.

    Why: under autocast a LoRA target's base output is a bf16 number, and peft adds the
    adapter's term ``s B A x`` to it in that dtype. A term smaller than half a bf16 ulp of the
    output (2**-9 relative) is then rounded away deterministically, and early in training
    (B has just left zero, or the learning rate is small) most of it is.
    `benchmarks/precision_loss.py` (demo clients, 4 steps, 8 clients x 2 seeds): with bf16
    sums, training losses came out 0.076 +- 0.018 (lr 1e-3) and 0.219 +- 0.038 (lr 3e-4) above
    fp32; with float32 outputs 0.010 +- 0.003 and 0.028 +- 0.005, for 6% more step time.
    Hooks registered after these (a merge's side branch) add in float32 too.
    The next matmul still runs in the autocast dtype; only the sums and the elementwise ops
    between them are float32. Without autocast nothing changes.
    """
    return [m.register_forward_hook(_upcast_output) for m in modules]
