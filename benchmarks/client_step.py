"""Seconds per local training step: fedlora's client vs. a plain peft loop, on SmolLM2-135M.

Both sides use the same LoraConfig (rank 8 on every default target module, alpha 16, no
dropout), the same batch (4 x 256 tokens, fixed random ids) and AdamW with the same options
and gradient clipping. Runs are interleaved (fedlora, peft, fedlora, peft, ...) after one
warm-up step each; fedlora's time includes `LoraHost.prepare` and `read_adapter` (everything
`train_client` does), the peft loop only its steps.

    HF_HUB_OFFLINE=1 python benchmarks/client_step.py [--steps 3] [--reps 1]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fedlora.client import TrainConfig, train_client  # noqa: E402
from fedlora.contract import ClientSpec, Payload  # noqa: E402
from fedlora.models import LoraHost, default_target_modules, load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--reps", type=int, default=1, help="interleaved repetitions")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    model_f, tok = load_model("smollm2")
    model_p, _ = load_model("smollm2")
    targets = default_target_modules(model_f)
    host = LoraHost(model_f, targets)
    spec = ClientSpec("bench", {m: args.rank for m in targets}, alpha=16.0)
    payload = Payload(None, None, seed=0)

    lcfg = LoraConfig(r=args.rank, lora_alpha=16.0, target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(model_p, lcfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == sum(
        a.numel() + b.numel() for a, b in zip(*host_params(host, spec, payload))
    ), "the two sides train different parameter counts"

    g = torch.Generator().manual_seed(0)
    n, L = args.batch_size, args.seq_len
    ids = torch.randint(10, model_f.config.vocab_size, (n, L), generator=g)
    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    cfg_kw = dict(batch_size=n, lr=3e-4, max_length=L, grad_clip=1.0)
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)

    def run_fedlora(steps: int) -> float:
        t = time.perf_counter()
        train_client(host, spec, payload, examples, TrainConfig(local_steps=steps, **cfg_kw))
        return time.perf_counter() - t

    def run_peft(steps: int) -> float:
        peft_model.train()
        t = time.perf_counter()
        for _ in range(steps):
            loss = peft_model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        return time.perf_counter() - t

    print(f"warm-up (1 step each), batch {n} x {L} tokens, rank {args.rank}", flush=True)
    run_fedlora(1)
    run_peft(1)
    fed, pef = [], []
    for rep in range(args.reps):
        fed.append(run_fedlora(args.steps) / args.steps)
        pef.append(run_peft(args.steps) / args.steps)
        print(
            f"rep {rep + 1}: fedlora {fed[-1]:.3f} s/step   peft {pef[-1]:.3f} s/step",
            flush=True,
        )
    f, p = sum(fed) / len(fed), sum(pef) / len(pef)
    print(f"fedlora client : {f:.3f} s/step ({args.steps} steps x {args.reps} reps)")
    print(f"plain peft loop: {p:.3f} s/step")
    print(f"ratio fedlora/peft: {f / p:.3f}")


def host_params(host: LoraHost, spec: ClientSpec, payload: Payload):
    host.prepare(spec, payload)
    a, b = host.trainable_parameters()
    return a, b


if __name__ == "__main__":
    main()
