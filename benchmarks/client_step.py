"""Seconds per local training step on SmolLM2-135M: a plain peft loop in fp32 against fedlora's
client in fp32, in bf16 autocast, and in bf16 autocast on bf16 base weights; plus loss curves
of the three fedlora precisions and the peak memory of a step with and without gradient
checkpointing.

Timing: for each rank type (FlexLoRA's type 1: rank 8 everywhere; type 3: 30 on attention,
200 on MLP modules) every variant runs one warm-up step, then ``--reps`` rounds in which each
variant takes one step, the order rotating every round, so all variants see the same machine
load. The batch is 4 x 256 random token ids. A fedlora step is a whole `train_client` call with
``local_steps=1`` (it also pays `LoraHost.prepare`, the optimizer set-up and `read_adapter`);
the peft step is forward, backward, clipping and AdamW only. Medians of wall seconds are
reported, with each variant's speed-up over peft fp32 and its warm-up (first) step's time.
``--compile`` adds bf16 on bf16 weights with ``train.compile``: its first step per rank type
is the compilation.

Loss curves: ``--curve-steps`` local steps of `train_client` on built-in task examples
(batch 4, same seed and data for every precision); the table gives each precision's largest
absolute and relative loss difference from fp32 over the curve.

Memory (``--memory``): the peak memory of one client step (after a warm-up step) above the
memory in use just before it, in a fresh process per setting: on CPU the peak resident set size
(the kernel's peak is reset before the step), on CUDA the peak allocated device memory.

    HF_HUB_OFFLINE=1 python benchmarks/client_step.py [--reps 3] [--curve-steps 8] [--memory]
        [--compile] [--device cuda] [--random-weights --curve-steps 0]

``--device`` puts the model there (a CUDA run synchronizes before reading the clock);
``--random-weights`` builds SmolLM2's architecture with random weights instead of loading the
packaged model, for a machine that lacks it (times and memory only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fedlora.clients.models import LoraHost, default_target_modules, load_model  # noqa: E402
from fedlora.clients.train import TrainConfig, train_client  # noqa: E402
from fedlora.core.contract import ClientSpec, Payload  # noqa: E402
from fedlora.federation.resources import resource_ranks  # noqa: E402

LR = 3e-4
ARGS = argparse.Namespace(device="cpu", random_weights=False)  # set by main()


def smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct on ``--device``; with ``--random-weights``
    its architecture with random weights and no tokenizer (step time and memory do not depend
    on the weights; for a machine without the packaged model)."""
    if not ARGS.random_weights:
        return load_model("smollm2", dtype=dtype, device=ARGS.device)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
        max_position_embeddings=8192, rms_norm_eps=1e-5, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(ARGS.device):
        return LlamaForCausalLM(cfg).to(dtype), None


def batch_examples(vocab: int, n: int, length: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (n, length), generator=g)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def peft_variant(targets, ranks, examples):
    """A plain peft model and one fp32 training step on the same batch."""
    from peft import LoraConfig, get_peft_model

    model, _ = smollm2()
    r0 = next(iter(ranks.values()))
    cfg = LoraConfig(
        r=r0,
        lora_alpha=16.0,
        target_modules=targets,
        rank_pattern={re.escape(m): r for m, r in ranks.items()},
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, cfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    ids = torch.tensor([e["input_ids"] for e in examples], device=ARGS.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def step() -> None:
        peft_model.train()
        loss = peft_model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step, sum(p.numel() for p in params)


def fedlora_variant(host, spec, examples, precision: str, compile: bool = False):
    cfg = TrainConfig(
        local_steps=1, batch_size=len(examples), lr=LR, max_length=len(examples[0]["input_ids"]),
        precision=precision, compile=compile,
    )  # fmt: skip

    def step() -> None:
        train_client(host, spec, Payload(None, None, seed=0), examples, cfg)

    return step


def timed(step) -> float:
    """Wall seconds of `step()`, its CUDA kernels included (the peft step does not wait)."""
    t = time.perf_counter()
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def time_variants(variants: dict, reps: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each variant's step times over `reps` rotating rounds, and its warm-up step's time."""
    first = {}
    for name, step in variants.items():  # warm-up (and, with compile, the compilation)
        first[name] = timed(step)
        print(f"  warm-up {name}: {first[name]:.2f}s", flush=True)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        order = names[i % len(names) :] + names[: i % len(names)]
        for n in order:
            times[n].append(timed(variants[n]))
        print(f"  rep {i + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    return times, first


def timing(args) -> None:
    model32, tok = smollm2()
    model16, _ = smollm2(torch.bfloat16)
    targets = default_target_modules(model32)
    host32 = LoraHost(model32, targets, alpha=16.0)
    host16 = LoraHost(model16, targets, alpha=16.0)
    examples = batch_examples(model32.config.vocab_size, args.batch_size, args.seq_len)
    rows = []
    for rank_type in (1, 3):
        ranks = resource_ranks(rank_type, targets)
        spec = ClientSpec(f"type{rank_type}", ranks, alpha=16.0)
        peft_step, n_peft = peft_variant(targets, ranks, examples)
        host32.prepare(spec, Payload(None, None))
        n_fed = sum(p.numel() for ps in host32.trainable_parameters() for p in ps)
        assert n_peft == n_fed, f"peft trains {n_peft} parameters, fedlora {n_fed}"
        variants = {
            "peft fp32": peft_step,
            "fedlora fp32": fedlora_variant(host32, spec, examples, "fp32"),
            "fedlora bf16": fedlora_variant(host32, spec, examples, "bf16"),
            "fedlora bf16 + bf16 weights": fedlora_variant(host16, spec, examples, "bf16"),
        }
        if args.compile:
            variants["fedlora bf16 + bf16 w + compile"] = fedlora_variant(
                host16, spec, examples, "bf16", compile=True
            )
        print(f"rank type {rank_type} ({n_fed / 1e6:.2f} M LoRA parameters)", flush=True)
        times, first = time_variants(variants, args.reps)
        base = statistics.median(times["peft fp32"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append((rank_type, name, med, min(ts), base / med, first[name]))
        del peft_step
    print(f"\nstep time, SmolLM2-135M, batch {args.batch_size} x {args.seq_len}, {args.reps} reps")
    head = f"{'ranks':<8}{'variant':<32}{'median s':>10}{'min s':>8}{'vs peft fp32':>14}"
    print(head + f"{'first step s':>14}")
    for rank_type, name, med, low, speedup, warm in rows:
        label = "type 1" if rank_type == 1 else "type 3"
        print(f"{label:<8}{name:<32}{med:>10.2f}{low:>8.2f}{speedup:>13.2f}x{warm:>14.1f}")


def curves(args) -> None:
    from fedlora.data import load_builtin

    data = load_builtin(["wn_define_noun"])[:64]
    out = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.float32),
                             ("bf16 + bf16 weights", torch.bfloat16)):  # fmt: skip
        model, tok = smollm2(dtype)
        targets = default_target_modules(model)
        host = LoraHost(model, targets, alpha=16.0)
        spec = ClientSpec("curve", resource_ranks(1, targets), alpha=16.0)
        cfg = TrainConfig(
            local_steps=args.curve_steps, batch_size=4, lr=1e-3, max_length=128, seed=0,
            precision=precision[:4],
        )  # fmt: skip
        losses = record_losses(host, spec, data, cfg, tok)
        out[precision] = losses
        print(f"  {precision:<22}" + " ".join(f"{x:.3f}" for x in losses), flush=True)
    ref = out["fp32"]
    print(f"\nloss curves, {args.curve_steps} steps of batch 4 (wn_define_noun), rank type 1")
    for name, losses in out.items():
        diff = max(abs(a - b) for a, b in zip(losses, ref))
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))
        print(f"  {name:<22} max |loss - fp32| {diff:.4f}  (relative {rel:.2%})")


def record_losses(host, spec, data, cfg, tok) -> list[float]:
    """The per-step losses of one `train_client` call, read from the step loop."""
    import fedlora.clients.local_steps as steps

    original, losses = steps._accumulate, []

    def recording(*a, **k):
        losses.append(original(*a, **k))
        return losses[-1]

    steps._accumulate = recording
    try:
        train_client(host, spec, Payload(None, None), data, cfg, tok)
    finally:
        steps._accumulate = original
    return losses


def _rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (``VmRSS``: now; ``VmHWM``: the peak)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def memory_child(checkpointing: bool, args) -> None:
    """One client step in this fresh process; prints the memory before it and its peak.

    CUDA: the peak allocated device memory. CPU (Linux): the peak resident set size of the step
    alone. glibc's ``malloc_trim`` first returns the memory the warm-up step freed (else it
    stays resident and hides the step's own peak), then writing 5 to /proc/self/clear_refs
    resets the kernel's peak (VmHWM) to the current RSS, so loading the model (whose transient
    peak is far higher than a step's) no longer hides the step either; the step's figure is its
    peak minus the RSS just before it.
    """
    model, _ = smollm2()
    device = torch.device(ARGS.device)
    targets = default_target_modules(model)
    host = LoraHost(model, targets, alpha=16.0)
    spec = ClientSpec("mem", resource_ranks(3, targets), alpha=16.0)
    examples = batch_examples(model.config.vocab_size, args.batch_size, args.seq_len)
    cfg = TrainConfig(
        local_steps=1, batch_size=args.batch_size, max_length=args.seq_len,
        precision=args.mem_precision, gradient_checkpointing=checkpointing,
    )  # fmt: skip
    train_client(host, spec, Payload(None, None), examples, cfg)  # warm-up: caches, threads
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed heap back first
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kib("VmRSS") * 1024
    train_client(host, spec, Payload(None, None), examples, cfg)
    if device.type == "cuda":
        after = torch.cuda.max_memory_allocated()
    else:
        after = _rss_kib("VmHWM") * 1024
    print(json.dumps({"device": str(device), "before": before, "after": after}))


def memory(args) -> None:
    print(f"\npeak memory of one client step (rank type 3, {args.mem_precision}), fresh process")
    for on in (False, True):
        cmd = [sys.executable, __file__, "--memory-child", str(int(on)),
               "--mem-precision", args.mem_precision, "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--device", args.device,
               *(["--random-weights"] if args.random_weights else [])]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        step = (r["after"] - r["before"]) / 2**20
        print(
            f"  gradient_checkpointing={str(on).lower():<5}  step peak +{step:7.0f} MiB over "
            f"the {r['before'] / 2**20:.0f} MiB in use before it ({r['device']})",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="timed steps per variant and rank type")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--curve-steps", type=int, default=8, help="0: skip the loss curves")
    ap.add_argument("--memory", action="store_true", help="also measure peak step memory")
    ap.add_argument(
        "--compile", action="store_true", help="also time bf16 with train.compile (compiles)"
    )
    ap.add_argument("--mem-precision", default="fp32")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")
    ap.add_argument(
        "--random-weights", action="store_true", help="SmolLM2's architecture, random weights"
    )
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    ARGS.device, ARGS.random_weights = args.device, args.random_weights
    if args.memory_child is not None:
        memory_child(bool(args.memory_child), args)
        return
    if args.random_weights and args.curve_steps:
        ap.error("--random-weights times steps only: add --curve-steps 0")
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device} {where}"
          + (", random weights" if args.random_weights else ""), flush=True)  # fmt: skip
    if not args.no_timing:
        timing(args)
    if args.curve_steps:
        curves(args)
    if args.memory:
        memory(args)


if __name__ == "__main__":
    main()
