"""Honest clients' contribution norms, relative to their round-mates: what `robust.max_norm_ratio`
must stay above so that honest training never trips it.

    python benchmarks/update_norms.py                                  # tiny preset, all strategies
    python benchmarks/update_norms.py --preset demo --strategies flexlora flora --rounds 2 \\
        --set train.local_steps=2 --set clients_per_round=4

Runs each strategy with no norm bound and reports, over every round and client, the largest
and smallest ratio ``norm / median(norms of the round's other clients)`` (the quantity the
relative bound compares with `robust.max_norm_ratio`), and the range of the norms themselves.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HOMOGENEOUS = ("fedit", "fedex_lora")


def ratios(rows) -> list[float]:
    out = []
    for r in rows:
        if r["kind"] != "round":
            continue
        norms = r["update_norms"]
        for c, n in norms.items():
            others = [v for k, v in norms.items() if k != c]
            if others and statistics.median(others) > 0:
                out.append(n / statistics.median(others))
    return out


def main() -> None:
    import fedlora.strategies as registry
    from fedlora.engine import run_experiment
    from fedlora.federation.config import load_preset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--strategies", nargs="+", default=registry.names())
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    extra = dict(kv.split("=", 1) for kv in args.set)
    head = f"{'preset':14s} {'strategy':11s} {'norms min':>10s} {'max':>10s} {'ratio min':>10s}"
    print(f"{head} {'max':>8s}  (ratio: norm / median of the round's others)")
    for name in args.strategies:
        with tempfile.TemporaryDirectory() as out:
            overrides = {
                **extra,
                "output_dir": out,
                "rounds": args.rounds,
                "strategy.name": name,
                "robust.max_norm_ratio": 0,
                "eval.every": 1000,
                "eval.max_examples": 1,
                "eval.metrics": ["loss"],
            }
            if name != load_preset(args.preset).strategy.name:  # options of another method
                overrides["strategy.options"] = {}
            if name in HOMOGENEOUS:
                overrides["resources.distribution"] = "homogeneous"
                overrides["resources.homogeneous_type"] = 1
                for key in ("resources.share", "resources.custom_share"):
                    overrides[key] = "none"
            cfg = load_preset(args.preset, overrides)
            result = run_experiment(cfg, progress=False, save_final=False)
        rows = result.round_rows()
        norms = [n for r in rows for n in r["update_norms"].values()]
        rs = ratios(rows)
        print(
            f"{args.preset:14s} {name:11s} {min(norms):10.3g} {max(norms):10.3g} "
            f"{min(rs):10.3f} {max(rs):8.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
