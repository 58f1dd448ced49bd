"""Two heterogeneous clients on the real SmolLM2-135M-Instruct, one LoraHost, a few steps each.

Client "r8" has rank 8 on every module (FlexLoRA rank type 1), client "a30m200" rank 30 on
attention and 200 on MLP modules (type 3). Each trains on a different built-in task and prints
its first/last loss (the client revisits its two batches, so the
loss falls). Takes about a minute on 2 CPU cores (more on a busy machine).

    HF_HUB_OFFLINE=1 python scripts/two_clients.py [--steps 3] [--batch-size 2] [--max-length 96]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora.clients.models import LoraHost, default_target_modules, load_model  # noqa: E402
from fedlora.clients.train import TrainConfig, train_client  # noqa: E402
from fedlora.core.contract import ClientSpec, Payload  # noqa: E402
from fedlora.data import load_builtin  # noqa: E402
from fedlora.federation.resources import resource_ranks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    targets = default_target_modules(model)
    host = LoraHost(model, targets)
    print(f"SmolLM2 loaded with {len(targets)} LoRA targets in {time.perf_counter() - t0:.1f} s")
    clients = [
        (ClientSpec("r8", resource_ranks(1, targets)), "wn_define_noun"),
        (ClientSpec("a30m200", resource_ranks(3, targets)), "rt_sentiment"),
    ]
    cfg = TrainConfig(
        local_steps=args.steps, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length
    )
    for spec, task in clients:
        data = load_builtin([task])[: 2 * args.batch_size]  # two batches, revisited
        update = train_client(host, spec, Payload(None, None, seed=0), data, cfg, tokenizer)
        ranks = sorted(set(spec.ranks.values()))
        params = sum(f.A.numel() + f.B.numel() for f in update.adapter.values())
        x = update.extras
        print(
            f"client {spec.client_id:8s} ranks {ranks} ({params / 1e6:.2f} M LoRA params), "
            f"task {task}: first loss {x['first_loss']:.3f}, last loss {x['last_loss']:.3f}, "
            f"mean {x['train_loss']:.3f} over {int(x['steps'])} steps in "
            f"{x['train_seconds']:.1f} s"
        )
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
