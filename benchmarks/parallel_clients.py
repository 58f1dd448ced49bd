"""Clients per second with ``train.parallel_clients`` = K: K clients trained together in one
forward/backward per step (`fedlora.clients.parallel.train_clients_together`) against K = 1 (the
sequential `fedlora.clients.train.train_client`, one client after another).

Workloads (the issue's): MiniLM classifier, batches of 16 x 48 tokens; SmolLM2-135M causal LM,
batches of 4 x 256 tokens. Each client trains ``--steps`` local steps from a fresh adapter with
heterogeneous ranks (8, 16, 4, 8, ... on every target module), so one measurement is a whole
client round: preparation, steps, optimizer, read-out. For every model each K first runs one
warm-up group, then ``--reps`` rounds in which every K runs one group, the order rotating each
round (interleaved, so all K see the same machine load). Reported: the median clients per
second of each K and its speed-up over K = 1. A CUDA run synchronizes before reading the clock.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/parallel_clients.py --device cpu \
        --threads 1 --ks 1 2 4 8 --reps 3
    HF_HUB_OFFLINE=1 python benchmarks/parallel_clients.py --device cuda --ks 1 2 4 8 16

``--precision auto`` (default): bf16 autocast on bf16 weights on CUDA, fp32 elsewhere (what
the presets train in on a CPU). ``--random-weights`` builds both architectures with random
weights (the time does not depend on the weights; for a machine without the packaged models);
without it a model that cannot be loaded falls back to random weights, with a note.
``--no-dropout`` sets MiniLM's dropout (0.1) to 0: with dropout a group applies every dropout
per client, under the client's own RNG stream (K calls per dropout site instead of one).
``--check`` also trains 4 clients as a group and one by one and prints the largest factor and
loss differences (the equivalence on this device and precision). A K whose
group runs out of accelerator memory is reported as such and the larger ones are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fedlora.clients.device import native_bf16  # noqa: E402
from fedlora.clients.models import LoraHost, default_modules_to_save, default_target_modules  # noqa: E402
from fedlora.clients.parallel import train_clients_together  # noqa: E402
from fedlora.clients.train import TrainConfig, train_client  # noqa: E402
from fedlora.core.contract import ClientSpec, Payload  # noqa: E402

WORKLOADS = {  # name: (kind, batch size, tokens per example)
    "minilm": ("classifier", 16, 48),
    "smollm2": ("causal", 4, 256),
}
RANKS = (8, 16, 4, 8)
NUM_LABELS = 4


def random_model(name: str):
    """The architecture of the packaged model (all-MiniLM-L6-v2, SmolLM2-135M) with random
    weights."""
    torch.manual_seed(0)
    if name == "minilm":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
            intermediate_size=1536, num_labels=NUM_LABELS,
        )  # fmt: skip
        return BertForSequenceClassification(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
        max_position_embeddings=8192, rms_norm_eps=1e-5, pad_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def load(name: str, args, dtype: torch.dtype):
    kind = WORKLOADS[name][0]
    model = None
    if not args.random_weights:
        try:
            from fedlora.clients.models import load_model

            model, _tok = load_model(name, kind, NUM_LABELS if kind == "classifier" else None)
        except Exception as e:  # noqa: BLE001 - a machine without the packaged model
            print(f"# {name}: cannot load the packaged model ({type(e).__name__}); random weights")
    if model is None:
        model = random_model(name)
    model = model.to(args.device, dtype)
    if args.no_dropout:  # MiniLM's dropout is 0.1: a group then applies it per client
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        for key, v in list(vars(model.config).items()):
            if "dropout" in key and isinstance(v, float):
                setattr(model.config, key, 0.0)
    mts = default_modules_to_save(model, kind)
    return LoraHost(model, default_target_modules(model), modules_to_save=mts), kind


def examples(kind: str, vocab: int, n: int, length: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (n, length), generator=g)
    if kind == "classifier":
        return [{"input_ids": row.tolist(), "label": i % NUM_LABELS} for i, row in enumerate(ids)]
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def group_items(host, kind, k: int, name: str, tag: int) -> list:
    """k clients of heterogeneous ranks, each with one batch of its own random examples."""
    vocab = host.model.config.vocab_size
    _k, bs, length = WORKLOADS[name]
    items = []
    for i in range(k):
        spec = ClientSpec(str(i), {m: RANKS[i % len(RANKS)] for m in host.module_names()})
        items.append((spec, Payload(None, None, seed=tag), examples(kind, vocab, bs, length, i)))
    return items


def check(host, kind, args, cfg: TrainConfig) -> dict:
    """A group of 4 against the same clients trained one by one: the largest factor and loss
    differences (float rounding only; bf16 rounds more than fp32)."""
    items = group_items(host, kind, 4, args.current, 99)
    seq = [train_client(host, s, p, d, cfg, server_round=99) for s, p, d in items]
    par = train_clients_together(host, items, cfg, server_round=99)
    dif, size, loss = 0.0, 0.0, 0.0
    for a, b in zip(seq, par or []):
        for m, f in a.adapter.items():
            g = b.adapter[m]
            dif = max(dif, float((f.A - g.A).abs().max()), float((f.B - g.B).abs().max()))
            size = max(size, float(f.B.abs().max()))
        loss = max(loss, abs(a.extras["train_loss"] - b.extras["train_loss"]))
    return {"model": args.current, "max_factor_diff": dif, "max_B": size, "max_loss_diff": loss}


def run_group(host, kind, k: int, args, cfg: TrainConfig, tag: int) -> float:
    """Seconds to train k clients (one group, or one by one for k = 1)."""
    items = group_items(host, kind, k, args.current, tag)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    if k == 1:
        for spec, payload, data in items:
            train_client(host, spec, payload, data, cfg, server_round=tag)
    else:
        out = train_clients_together(host, items, cfg, server_round=tag)
        bad = [r for r in out or [] if isinstance(r, Exception)]
        if out is None or bad:
            raise RuntimeError(f"group of {k} did not train: {bad[:1] or 'not batchable'}")
    sync()
    return time.perf_counter() - t0


def measure(name: str, args) -> list[dict]:
    device = torch.device(args.device)
    bf16 = args.precision == "bf16" or (
        args.precision == "auto" and device.type == "cuda" and native_bf16(device)
    )
    dtype = torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32
    host, kind = load(name, args, dtype)
    args.current = name
    _kind, bs, _length = WORKLOADS[name]
    precision = "bf16" if bf16 else "fp32"
    cfg = TrainConfig(local_steps=args.steps, batch_size=bs, max_length=512, precision=precision)
    times: dict[int, list[float]] = {}
    ks = []
    for k in args.ks:  # warm-up, and drop a K that does not fit
        try:
            run_group(host, kind, k, args, cfg, 0)
            ks.append(k)
            times[k] = []
        except torch.OutOfMemoryError:
            print(f"# {name}: K = {k} runs out of accelerator memory; larger K skipped")
            torch.cuda.empty_cache()
            break
    for rep in range(args.reps):
        order = ks[rep % len(ks) :] + ks[: rep % len(ks)]
        for k in order:
            times[k].append(run_group(host, kind, k, args, cfg, rep + 1))
    base = 1 / statistics.median(times[ks[0]]) if ks and ks[0] == 1 else None
    rows = []
    for k in ks:
        rate = k / statistics.median(times[k])
        rows.append(
            {
                "model": name, "K": k, "clients_per_s": rate,
                "speedup": rate / base if base else None, "device": args.device,
                "precision": precision, "steps": args.steps, "reps": args.reps,
                "dropout": not args.no_dropout,
                "seconds": times[k],
            }
        )  # fmt: skip
    if args.check:
        rows.append(check(host, kind, args, cfg))
    del host
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="local steps per client")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--random-weights", action="store_true")
    p.add_argument(
        "--check", action="store_true", help="also compare a group's updates with sequential ones"
    )
    p.add_argument(
        "--no-dropout",
        action="store_true",
        help="set the models' dropout to 0 (the cost of per-client dropout streams)",
    )
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows += measure(name, args)
    print("| model | device | precision | K | clients/s | vs K=1 |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        if "max_factor_diff" in r:
            continue
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(
            f"| {r['model']} | {r['device']} | {r['precision']} | {r['K']} | "
            f"{r['clients_per_s']:.3f} | {sp} |"
        )
    for r in rows:
        if "max_factor_diff" in r:
            print(f"# check {r['model']}: group of 4 vs one by one: {json.dumps(r)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
