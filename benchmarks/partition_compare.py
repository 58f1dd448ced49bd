"""fedlora's Dirichlet and pathological partitioners beside flwr-datasets' (docs/data.md).

For each setting, both split the same labelled examples over the same clients for several
seeds; the table gives label-distribution statistics as mean ± std over the seeds:

* ``classes``: classes a client holds (mean over clients);
* ``entropy``: entropy (nats) of a client's label histogram (mean over clients);
* ``TV``: total-variation distance of a client's label mix from the global one (mean over
  clients; 0 = IID, 1 = disjoint);
* ``size CV``: standard deviation / mean of the client sizes; ``min``: the smallest client;
* ``kept``: share of the examples that some client holds (fedlora's keep every example).

    python benchmarks/partition_compare.py                 # wn_lexname, 20 clients, 10 seeds
    python benchmarks/partition_compare.py --clients 10 --seeds 5 --task wn_noun_category
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from fedlora.data import load_builtin, partition
from fedlora.data.flwr_partition import FlwrPartitioner

STATS = ("classes", "entropy", "TV", "size CV", "min", "kept")


def label_stats(labels: Sequence[str], parts: Sequence[Sequence[int]]) -> dict[str, float]:
    """The statistics of one split (see the module docstring)."""
    names = sorted(set(labels))
    col = {name: j for j, name in enumerate(names)}
    y = np.array([col[v] for v in labels])
    glob = np.bincount(y, minlength=len(names)) / len(y)
    counts = np.array([np.bincount(y[list(p)], minlength=len(names)) for p in parts], float)
    sizes = counts.sum(1)
    mix = counts / np.maximum(sizes[:, None], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(mix > 0, mix * np.log(mix), 0.0).sum(1)
    return {
        "classes": float((counts > 0).sum(1).mean()),
        "entropy": float(ent.mean()),
        "TV": float(0.5 * np.abs(mix - glob).sum(1).mean()),
        "size CV": float(sizes.std() / sizes.mean()),
        "min": float(sizes.min()),
        "kept": float(sizes.sum() / len(y)),
    }


Split = Callable[[list, int, int], list[list[int]]]


def settings(alphas: Sequence[float], k: int, min_size: int) -> list[tuple[str, Split]]:
    """(name, split(examples, clients, seed)) of every compared partitioner setting."""
    out: list[tuple[str, Split]] = []
    for a in alphas:
        out.append(
            (
                f"dirichlet a={a}: fedlora",
                lambda ex, n, s, a=a: partition(
                    ex, "dirichlet", n, alpha=a, min_size=min_size, key="label", seed=s
                ),
            )
        )
        flwr = FlwrPartitioner(
            "flwr_datasets:DirichletPartitioner", {"alpha": a, "min_partition_size": min_size}
        )
        out.append((f"dirichlet a={a}: flwr-datasets", flwr))
    out.append(
        (
            f"pathological k={k}: fedlora",
            lambda ex, n, s: partition(ex, "pathological", n, classes_per_client=k, seed=s),
        )
    )
    for mode in ("random", "first-deterministic", "deterministic"):
        flwr = FlwrPartitioner(
            "flwr_datasets:PathologicalPartitioner",
            {"num_classes_per_partition": k, "class_assignment_mode": mode},
        )
        out.append((f"pathological k={k}: flwr-datasets {mode}", flwr))
    return out


def measure(examples, clients: int, seeds: int, split: Split) -> dict[str, tuple[float, float]]:
    labels = [e.label for e in examples]
    rows = [label_stats(labels, split(examples, clients, s)) for s in range(seeds)]
    return {
        k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows])))
        for k in STATS
    }


def table(results: dict[str, dict[str, tuple[float, float]]]) -> str:
    """A markdown table: one row per setting, mean ± std over seeds per statistic."""
    lines = ["| partitioner | " + " | ".join(STATS) + " |", "|---|" + "---:|" * len(STATS)]
    for name, stats in results.items():
        cells = [
            f"{m:.2f} ± {s:.2f}" if k != "min" else f"{m:.0f} ± {s:.0f}"
            for k, (m, s) in stats.items()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="wn_lexname", help="a labelled built-in task")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--alphas", default="0.1,0.5,1.0")
    p.add_argument("--classes-per-client", type=int, default=3)
    p.add_argument("--min-size", type=int, default=10, help="both Dirichlet splits' minimum")
    args = p.parse_args(argv)
    examples = load_builtin([args.task])
    alphas = [float(a) for a in args.alphas.split(",")]
    results = {}
    with warnings.catch_warnings():  # flwr-datasets warns at each Dirichlet redraw
        warnings.simplefilter("ignore", UserWarning)
        for name, split in settings(alphas, args.classes_per_client, args.min_size):
            results[name] = measure(examples, args.clients, args.seeds, split)
    n_classes = len({e.label for e in examples})
    text = (
        f"{args.task}: {len(examples)} examples, {n_classes} classes, {args.clients} clients, "
        f"seeds 0-{args.seeds - 1}\n\n" + table(results)
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
