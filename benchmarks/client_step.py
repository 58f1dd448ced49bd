"""Seconds per local training step: fedlora's client vs. a plain peft loop, on SmolLM2-135M.

Both sides use the same LoraConfig (rank 8 on every default target module, alpha 16, no
dropout), the same batch (4 x 256 tokens, fixed random ids) and AdamW with the same options
and gradient clipping. Steps are timed one at a time and interleaved (fedlora, peft, then
peft, fedlora, ...) after one warm-up step each. Each fedlora step is a full `train_client`
call with ``local_steps=1``, so it also pays `LoraHost.prepare`, the optimizer set-up and
`read_adapter`; the peft step is only forward, backward, clipping and AdamW. Wall and process CPU
seconds are reported as medians: on a shared machine single steps are noisy.

    HF_HUB_OFFLINE=1 python benchmarks/client_step.py [--steps 3] [--reps 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fedlora.client import TrainConfig, train_client  # noqa: E402
from fedlora.contract import ClientSpec, Payload  # noqa: E402
from fedlora.models import LoraHost, default_target_modules, load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    ap.add_argument("--reps", type=int, default=2, help="repetitions (steps * reps samples)")
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

    def fedlora_step() -> tuple[float, float]:
        """One call of train_client with local_steps=1: prepare + step + read_adapter."""
        t, c = time.perf_counter(), time.process_time()
        train_client(host, spec, payload, examples, TrainConfig(local_steps=1, **cfg_kw))
        return time.perf_counter() - t, time.process_time() - c

    def peft_step() -> tuple[float, float]:
        peft_model.train()
        t, c = time.perf_counter(), time.process_time()
        loss = peft_model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return time.perf_counter() - t, time.process_time() - c

    print(f"warm-up (1 step each), batch {n} x {L} tokens, rank {args.rank}", flush=True)
    fedlora_step()
    peft_step()
    fed: list[tuple[float, float]] = []
    pef: list[tuple[float, float]] = []
    for i in range(args.steps * args.reps):
        if i % 2 == 0:  # alternate which side goes first
            fed.append(fedlora_step())
            pef.append(peft_step())
        else:
            pef.append(peft_step())
            fed.append(fedlora_step())
        print(
            f"step {i + 1}: fedlora {fed[-1][0]:.3f} s (cpu {fed[-1][1]:.3f})   "
            f"peft {pef[-1][0]:.3f} s (cpu {pef[-1][1]:.3f})",
            flush=True,
        )
    for k, what in ((0, "wall"), (1, "cpu")):
        f = [x[k] for x in fed]
        p = [x[k] for x in pef]
        f_med, p_med = statistics.median(f), statistics.median(p)
        print(
            f"[{what}] fedlora client : median {f_med:.3f} s/step, "
            f"min {min(f):.3f}, mean {mean(f):.3f}"
        )
        print(
            f"[{what}] plain peft loop: median {p_med:.3f} s/step, "
            f"min {min(p):.3f}, mean {mean(p):.3f}"
        )
        print(f"[{what}] ratio fedlora/peft: median {f_med / p_med:.3f}, min {min(f) / min(p):.3f}")


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def host_params(host: LoraHost, spec: ClientSpec, payload: Payload):
    host.prepare(spec, payload)
    a, b = host.trainable_parameters()
    return a, b


if __name__ == "__main__":
    main()
