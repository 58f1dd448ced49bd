"""Server memory and round time against the number of clients (in-process engine, tiny model).

    python benchmarks/scale.py                      # 100 and 1,000 clients, 5% per round
    python benchmarks/scale.py --clients 100 1000 5000 --strategies flexlora flora hetlora

Each client trains 1 local step on a tiny random Llama, so the numbers are the server's:
the peak of traced Python allocations during the round's streamed aggregation (tracemalloc;
clients train inside that stream, one at a time, so their Python-side work counts too), the
size of the strategy's state (tensors and per-client bookkeeping, pickled), the process RSS
after the last round, and the mean round time. With a fixed fraction sampled per round the
per-round work grows with the sampled count; what must not grow with the total client count
is the state the server keeps between rounds.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def state_nbytes(strategy) -> int:
    import torch

    buf = io.BytesIO()
    torch.save(strategy.state_dict(), buf)
    return buf.tell()


def run(num_clients: int, strategy: str, rounds: int, fraction: float, out: str) -> dict:
    from fedlora.engine import run_experiment
    from fedlora.federation.config import load_preset

    cfg = load_preset(
        "tiny",
        {
            "output_dir": out,
            "rounds": rounds,
            "clients_per_round": fraction,
            "strategy.name": strategy,
            "data.tasks": None,
            "data.heldout_tasks": [],
            "data.partition": "iid",
            "data.num_clients": num_clients,
            "data.test_fraction": 0.1,
            "data.max_examples_per_client": 4,
            "train.local_steps": 1,
            "train.batch_size": 2,
            "train.max_length": 32,
            "eval.every": rounds,
            "eval.metrics": ["loss"],
            "eval.max_examples": 8,
            "eval.per_task": False,
            "threads": 1,
        },
    )
    t = time.perf_counter()
    result = run_experiment(cfg, progress=False, profile_memory=True, save_final=False)
    rows = result.round_rows()
    return {
        "clients": num_clients,
        "sampled": rows[0]["replies"],
        "strategy": strategy,
        "agg_peak_kb": max(r["mem_aggregate_peak_bytes"] for r in rows) / 1024,
        "state_kb": state_nbytes(result.strategy) / 1024,
        "rss_mb": rows[-1]["mem_rss_mb"],
        "round_s": sum(r["time_round"] for r in rows) / len(rows),
        "train_s": sum(r["time_train"] for r in rows) / len(rows),
        "agg_ms": 1000 * sum(r["time_aggregate"] for r in rows) / len(rows),
        "total_s": time.perf_counter() - t,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--strategies", nargs="+", default=["flexlora", "flora"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.one:  # child process: one configuration, a JSON line on stdout
        with tempfile.TemporaryDirectory() as out:
            r = run(args.clients[0], args.strategies[0], args.rounds, args.fraction, out)
        print("RESULT " + json.dumps(r))
        return 0
    header = (
        f"{'strategy':<10} {'clients':>7} {'sampled':>7} {'agg peak':>10} {'state':>10} "
        f"{'RSS':>9} {'round':>8} {'train':>8} {'aggregate':>10}"
    )
    print(header)
    print("-" * len(header))
    for strategy in args.strategies:
        for n in args.clients:
            # a fresh process per configuration, so RSS is not inherited from the last one
            cmd = [sys.executable, __file__, "--one", "--clients", str(n)]
            cmd += ["--strategies", strategy, "--rounds", str(args.rounds)]
            cmd += ["--fraction", str(args.fraction)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            r = json.loads(line[len("RESULT ") :])
            print(
                f"{strategy:<10} {r['clients']:>7} {r['sampled']:>7} "
                f"{r['agg_peak_kb']:>8.1f}KB {r['state_kb']:>8.1f}KB {r['rss_mb']:>7.0f}MB "
                f"{r['round_s']:>7.2f}s {r['train_s']:>7.2f}s {r['agg_ms']:>8.1f}ms",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
