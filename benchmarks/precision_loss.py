"""How much mixed precision changes what a client learns: the demo's clients trained in fp32,
in bf16 autocast, in bf16 autocast on bf16 base weights, and in bf16 autocast with the LoRA term
added to the target outputs in bf16 (peft's plain sum, i.e. without
`fedlora.clients.device.float32_outputs`), side by side on the same data, seeds and start.

For every training client of the demo preset, two training seeds and two learning rates, each
variant runs one `train_client` call (the preset's local steps, batch and clipping) from the
same fresh adapter. Reported per variant against fp32: the mean difference (and its standard
error over clients x seeds) of the training loss (the mean of the steps' losses, each computed
in the variant's precision) and of the loss of the trained adapter on the client's own data
evaluated in fp32 (in bf16 autocast for bf16 weights), plus the median seconds per client
call. For scale: the same differences between the two training seeds in fp32.

    HF_HUB_OFFLINE=1 python benchmarks/precision_loss.py [--lrs 1e-3,3e-4] [--seeds 0,1]
        [--variants 'bf16,bf16 + bf16 weights,bf16 with bf16 LoRA sums']
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fedlora.clients.device import float32_outputs  # noqa: E402
from fedlora.clients.train import _features, train_client  # noqa: E402
from fedlora.core.contract import Payload  # noqa: E402
from fedlora.data import (
    collate,  # noqa: E402
    pad_id,  # noqa: E402
)
from fedlora.federation.build import build_clients  # noqa: E402
from fedlora.federation.config import load_preset, override  # noqa: E402

VARIANTS = ("fp32", "bf16", "bf16 + bf16 weights", "bf16 with bf16 LoRA sums")


def own_loss(model, feats, pad: int) -> float:
    """Token-weighted loss of `model` on `feats`: fp32 on float32 weights; on bf16 weights in
    bf16 autocast (as fedlora evaluates them: without autocast they would compute in bf16
    end to end)."""
    model.eval()
    total = count = 0.0
    bf16_weights = next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16_weights):
        for i in range(0, len(feats), 8):
            b = collate(feats[i : i + 8], pad)
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b).loss) * n
            count += n
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", default="1e-3,3e-4")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="fp32 is always run")
    args = ap.parse_args()
    variants = ["fp32"] + [v for v in args.variants.split(",") if v in VARIANTS and v != "fp32"]
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    fed32 = build_clients(load_preset("demo"))
    fed16 = None
    if "bf16 + bf16 weights" in variants:
        demo16 = override(load_preset("demo"), "train.precision", "bf16")
        fed16 = build_clients(override(demo16, "model.dtype", "bfloat16"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; demo preset, "
          f"{len(fed32.train_clients)} clients x seeds {seeds} x lr {lrs}", flush=True)  # fmt: skip
    res: dict[tuple, tuple[float, float, float]] = {}
    for c in fed32.train_clients:
        for v in variants:
            fed = fed16 if "weights" in v else fed32
            host, tok = fed.host, fed.tokenizer
            spec, data = fed.specs[c], fed.client_data(c)
            feats = _features(data, tok, fed.train_cfg.max_length, "benchmark")
            pad = pad_id(tok, host.model)
            if "LoRA sums" in v:
                for h in host.output_hooks:
                    h.remove()
            try:
                for lr in lrs:
                    for seed in seeds:
                        precision = "fp32" if v == "fp32" else "bf16"
                        tc = dataclasses.replace(fed.train_cfg, precision=precision, seed=seed,
                                                 lr=lr)  # fmt: skip
                        t = time.perf_counter()
                        u = train_client(host, spec, Payload(None, None, seed=0), data, tc, tok)
                        dt = time.perf_counter() - t
                        res[c, v, lr, seed] = (u.extras["train_loss"],
                                               own_loss(host.model, feats, pad), dt)  # fmt: skip
            finally:
                if "LoRA sums" in v:
                    host.output_hooks = float32_outputs(host._base.values())
        print(f"  client {c}: " + ", ".join(
            f"{v} {statistics.mean(res[c, v, lr, s][0] for lr in lrs for s in seeds):.3f}"
            for v in variants), flush=True)  # fmt: skip
    cs = fed32.train_clients

    def diff(v: str, lr: float, i: int) -> str:
        d = [res[c, v, lr, s][i] - res[c, "fp32", lr, s][i] for c in cs for s in seeds]
        se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
        return f"{statistics.mean(d):+.4f} ± {se:.4f}"

    print("\nmean difference from fp32 (± standard error over clients x seeds)")
    print(f"{'variant':<24}{'lr':>8}{'train loss':>20}{'own-data loss':>24}{'s/client':>10}")
    for v in variants:
        for lr in lrs:
            sec = statistics.median(res[c, v, lr, s][2] for c in cs for s in seeds)
            cells = ("", "") if v == "fp32" else (diff(v, lr, 0), diff(v, lr, 1))
            print(f"{v:<24}{lr:>8g}{cells[0]:>20}{cells[1]:>24}{sec:>10.2f}")
    if len(seeds) > 1:
        for lr in lrs:
            d = [abs(res[c, "fp32", lr, seeds[1]][i] - res[c, "fp32", lr, seeds[0]][i])
                 for c in cs for i in (0,)]  # fmt: skip
            print(f"for scale, fp32 seed {seeds[1]} vs seed {seeds[0]} at lr {lr:g}: "
                  f"mean |train-loss difference| {statistics.mean(d):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
