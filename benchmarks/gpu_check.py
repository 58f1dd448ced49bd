"""fedlora's accelerator paths on a real CUDA GPU: what CI (CPU only) cannot run.

Sections (``--only`` picks some; each reports and goes on when another fails):

* ``device``: ``train.device = "auto"`` and ``train.precision = "auto"`` resolve to the GPU and
  bf16; one client of the tiny Llama trained on the GPU in fp32, bf16, bf16 on bf16 weights,
  fp16 (gradient scaler), with gradient checkpointing, with 2 x 2 accumulated micro-batches
  and compiled, each against the same client trained on the CPU in fp32 (loss and learned
  delta); the update comes back as CPU float32; evaluation (loss and KV-cache generation) on
  the GPU against the CPU.
* ``cli``: ``fedlora run`` on the GPU: the tiny preset with every issue-8 key, and FLoRA and
  FedEx-LoRA (merges kept as a side branch) on a 4-bit and an 8-bit base (bitsandbytes).
* ``llama8b``: a Llama-3-8B (random weights, saved once, loaded through `load_model` in 4-bit
  NF4) per FlexLoRA resource type 1-4: a client's peak device memory for one local step of a
  4 x 256 micro-batch with gradient checkpointing, beside `scripts/memory_estimate.py`'s bound.

    python benchmarks/gpu_check.py [--only device,cli,llama8b] [--work /tmp/gpu_check]

Exits 1 when a check fails; 2 when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from client_step import batch_examples  # noqa: E402  (this folder: the benchmark's batch)

from fedlora.clients.device import resolve_device, resolve_precision  # noqa: E402
from fedlora.clients.evaluate import evaluate  # noqa: E402
from fedlora.clients.models import LoraHost, default_target_modules, load_model  # noqa: E402
from fedlora.clients.tiny import build_tiny, byte_tokenizer  # noqa: E402
from fedlora.clients.train import TrainConfig, train_client  # noqa: E402
from fedlora.core.contract import ClientSpec, Payload  # noqa: E402
from fedlora.data import load_builtin  # noqa: E402
from fedlora.federation.resources import resource_ranks  # noqa: E402

GIB = 2**30
FAILED: list[str] = []
DEV = "cuda"  # --device: "cpu" dry-runs the checks' code where no GPU is


def check(name: str, ok: bool, detail: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def tiny_client(device: str, precision: str, dtype=torch.float32, **cfg):
    model, tok = build_tiny("tiny-llama")
    model = model.to(device, dtype)
    host = LoraHost(model, default_target_modules(model), alpha=16.0)
    spec = ClientSpec("c", {m: 4 for m in host.module_names()}, alpha=16.0)
    data = load_builtin(["wn_define_noun"])[:16]
    options = dict(local_steps=4, batch_size=4, lr=1e-2, max_length=64, seed=0) | cfg
    u = train_client(
        host,
        spec,
        Payload(None, None, seed=0),
        data,
        TrainConfig(precision=precision, **options),
        tok,
    )
    return u, host, tok


def rel_delta(u, ref) -> float:
    num = sum(
        float((u.adapter[m].delta() - f.delta()).double().norm() ** 2)
        for m, f in ref.adapter.items()
    )
    den = sum(float(f.delta().double().norm() ** 2) for f in ref.adapter.values())
    return (num / den) ** 0.5


def section_device(args) -> None:
    check("auto device", resolve_device("auto").type == "cuda", str(resolve_device("auto")))
    prec = resolve_precision("auto", torch.device(DEV))
    check("auto precision", prec == torch.bfloat16, str(prec))
    ref, host_cpu, tok = tiny_client("cpu", "fp32")
    cases = [  # name, precision, storage dtype, extra config, tolerance
        ("cuda fp32", "fp32", torch.float32, {}, 1e-3),
        ("cuda bf16 autocast", "bf16", torch.float32, {}, 0.2),
        ("cuda bf16 on bf16 weights", "bf16", torch.bfloat16, {}, 0.2),
        ("cuda fp16 + scaler", "fp16", torch.float32, {}, 0.2),
        ("cuda fp32 checkpointing", "fp32", torch.float32, {"gradient_checkpointing": True}, 1e-3),
        (
            "cuda fp32 2x2 accumulation",
            "fp32",
            torch.float32,
            {"batch_size": 2, "grad_accum_steps": 2},
            1e-3,
        ),
        ("cuda fp32 compiled", "fp32", torch.float32, {"compile": True}, 1e-3),
    ]
    for name, precision, dtype, cfg, tol in cases:
        t = time.perf_counter()
        u, host, _ = tiny_client(DEV, precision, dtype, **cfg)
        loss = abs(u.extras["last_loss"] - ref.extras["last_loss"]) / ref.extras["last_loss"]
        d = rel_delta(u, ref)
        f = next(iter(u.adapter.values()))
        on_cpu = f.A.device.type == "cpu" and f.A.dtype == torch.float32
        check(
            name,
            d < tol and loss < tol and on_cpu,
            f"last loss {u.extras['last_loss']:.4f} "
            f"(cpu fp32 {ref.extras['last_loss']:.4f}), delta off by {d:.2e} (tolerance "
            f"{tol:g}), update on cpu float32: {on_cpu}, {time.perf_counter() - t:.1f} s",
        )
    evals = load_builtin(["wn_define_noun"])[16:32]
    got = {}
    for device in ("cpu", DEV):
        u, host, tok = tiny_client(device, "fp32")
        with host.use_global(u.adapter) as model:
            got[device] = evaluate(model, tok, evals, ("loss", "rouge_l"), max_new_tokens=8)
    same = abs(got[DEV]["loss"] - got["cpu"]["loss"]) < 1e-4 * got["cpu"]["loss"]
    check(
        f"evaluation {DEV} = cpu",
        same,
        f"loss {got[DEV]['loss']:.6f} vs "
        f"{got['cpu']['loss']:.6f}; rouge_l {got[DEV].get('rouge_l')} vs "
        f"{got['cpu'].get('rouge_l')}",
    )


def fedlora_run(args, name: str, *options: str) -> None:
    out = Path(args.work) / name
    cmd = [
        sys.executable,
        "-m",
        "fedlora.cli.commands",
        "run",
        "--output-dir",
        str(out),
        "--overwrite",
        "-q",
        *options,
    ]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    check(
        f"fedlora run {name}",
        r.returncode == 0,
        f"exit {r.returncode} in {time.perf_counter() - t:.0f} s: {tail[0][:300]}",
    )


def small_llama_dir(work: Path, hidden: int = 256) -> Path:
    """A small random Llama saved with a tokenizer, loadable by `load_model` (4/8-bit)."""
    path = work / f"llama-h{hidden}"
    if not (path / "config.json").exists():
        model, tok = build_tiny("tiny-llama", hidden=hidden)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


def section_cli(args) -> None:
    fedlora_run(
        args,
        "tiny-issue8",
        "--preset",
        "tiny",
        "--set",
        f"train.device={DEV}",
        "--set",
        "train.precision=bf16",
        "--set",
        "train.grad_accum_steps=2",
        "--set",
        "train.gradient_checkpointing=true",
        "--set",
        "train.lr_scheduler=cosine",
    )
    path = small_llama_dir(Path(args.work))
    for quant in ("4bit", "8bit"):
        for strategy in ("flora", "fedex_lora"):
            extra = (
                ["--set", "resources.distribution=homogeneous"] if strategy == "fedex_lora" else []
            )
            fedlora_run(
                args,
                f"{strategy}-{quant}",
                "--preset",
                "tiny",
                "--strategy",
                strategy,
                "--set",
                f"model.name={path}",
                "--set",
                f"model.quantization={quant}",
                "--set",
                f"train.device={DEV}",
                "--set",
                "train.precision=bf16",
                "--rounds",
                "2",
                *extra,
            )


def section_llama8b(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from memory_estimate import llama3_8b  # the shapes the README's estimate uses

    path = Path(args.work) / "llama3-8b-random"
    t = time.perf_counter()
    if not (path / "config.json").exists():
        _, cls, cfg = llama3_8b()
        cfg.pad_token_id = 0
        with torch.device(DEV):
            model = cls(cfg).to(torch.bfloat16)
        model.save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    print(f"  random Llama-3-8B saved in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    model, _ = load_model(
        str(path),
        dtype=torch.bfloat16,
        device=DEV,
        quantization="4bit",
        compute_dtype=torch.bfloat16,
    )
    base = torch.cuda.memory_allocated()
    print(
        f"  loaded in 4-bit in {time.perf_counter() - t:.0f} s: {base / GIB:.2f} GiB on the GPU",
        flush=True,
    )
    targets = default_target_modules(model)
    host = LoraHost(model, targets, alpha=16.0, max_adapters=1)
    examples = batch_examples(model.config.vocab_size, 4, 256)
    for rank_type in (1, 2, 3, 4):
        spec = ClientSpec(f"type{rank_type}", resource_ranks(rank_type, targets), alpha=16.0)
        cfg = TrainConfig(
            local_steps=2,
            batch_size=4,
            max_length=256,
            precision="bf16",
            gradient_checkpointing=True,
        )
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t = time.perf_counter()
        u = train_client(host, spec, Payload(None, None), examples, cfg)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
        print(
            f"  type {rank_type}: peak {peak / GIB:5.2f} GiB allocated ({reserved / GIB:5.2f} "
            f"reserved), {before / GIB:.2f} GiB before the client; 2 steps in "
            f"{time.perf_counter() - t:.1f} s, loss {u.extras['first_loss']:.3f} -> "
            f"{u.extras['last_loss']:.3f}",
            flush=True,
        )


SECTIONS = {"device": section_device, "cli": section_cli, "llama8b": section_llama8b}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--work", default="/tmp/gpu_check", help="scratch folder (models, runs)")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device here", file=sys.stderr)
        return 2
    Path(args.work).mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if DEV == "cuda" else DEV
    print(f"torch {torch.__version__}, {name}", flush=True)
    for name in args.only.split(","):
        print(f"\n[{name}]", flush=True)
        t = time.perf_counter()
        try:
            SECTIONS[name](args)
        except Exception:  # noqa: BLE001 - report and go on to the next section
            traceback.print_exc()
            FAILED.append(name)
        print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    print("\nfailed: " + (", ".join(FAILED) if FAILED else "none"))
    return 1 if FAILED else 0


if __name__ == "__main__":
    raise SystemExit(main())
