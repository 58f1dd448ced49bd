"""Federated partitioners: split example indices over clients (seeded, numpy only).

Every scheme returns ``list[list[int]]``: the sorted example indices of each client, covering
every index exactly once.

* ``iid``: a seeded shuffle cut into ``num_clients`` near-equal parts.
* ``by_task``: the natural split, one task per client. More clients than tasks: each task gets
  clients in proportion to its size (every task at least one; D'Hondt rounding) and its
  examples are cut evenly among them. Fewer clients than tasks: whole tasks are grouped, the
  largest first onto the currently smallest client, so every client holds one or more tasks and
  every task lives on exactly one client.
* ``dirichlet``: for each class of ``key`` draw client proportions ~ Dir(alpha) and cut that
  class's shuffled examples accordingly (Hsu et al., 2019); small alpha = skewed. The draw is
  repeated until every client has at least ``min_size`` examples.
* ``pathological``: each client holds exactly ``classes_per_client`` classes (classes dealt
  round-robin from a seeded permutation; a class shared by several clients is cut evenly).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlora.data.examples import Example

SCHEMES = ("iid", "by_task", "dirichlet", "pathological")
MAX_DIRICHLET_DRAWS = 1000


def _resolve_key(examples: Sequence[Example], key: str | None) -> str:
    if key is None:
        return "label" if all(e.label is not None for e in examples) else "task"
    if key not in ("label", "task"):
        raise ValueError(f"key must be 'label' or 'task', got {key!r}")
    return key


def _keys(examples: Sequence[Example], key: str) -> list[str]:
    values = [getattr(e, key) for e in examples]
    for i, v in enumerate(values):
        if v is None:
            raise ValueError(
                f"key={key!r}: example {i} (task {examples[i].task!r}) has no {key}; "
                "use key='task' or keep only classification examples"
            )
    return values


def _groups(values: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v, []).append(i)
    return groups


def _finish(parts: Sequence[Sequence[int]]) -> list[list[int]]:
    return [sorted(int(i) for i in p) for p in parts]


def partition(
    examples: Sequence[Example],
    scheme: str | Callable[[Sequence[Example], int, int], list[list[int]]],
    num_clients: int,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    key: str | None = None,
    min_size: int = 1,
    seed: int = 0,
) -> list[list[int]]:
    """Split ``examples`` over ``num_clients`` clients with ``scheme`` (see module docstring).

    ``scheme`` may also be a callable ``(examples, num_clients, seed) -> indices per client``.
    ``key`` ("label" or "task") is the class for dirichlet/pathological; default: "label" when
    every example has one, else "task". Returns the example indices of each client.
    """
    if callable(scheme):  # e.g. a flwr-datasets partitioner (fedlora.data.flwr_partition)
        return _finish(scheme(examples, num_clients, seed))
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: unknown {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    n = len(examples)
    if n == 0:
        raise ValueError("examples: nothing to partition (empty)")
    if num_clients > n:
        raise ValueError(f"num_clients={num_clients} is more than the {n} examples")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return _finish(np.array_split(rng.permutation(n), num_clients))
    if scheme == "by_task":
        return _by_task(_groups(_keys(examples, "task")), num_clients, rng)
    key = _resolve_key(examples, key)
    groups = _groups(_keys(examples, key))
    if scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if min_size < 0 or min_size * num_clients > n:
            raise ValueError(
                f"min_size={min_size} cannot be met by {n} examples over {num_clients} clients"
            )
        return _dirichlet(groups, num_clients, alpha, min_size, rng)
    k = classes_per_client
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"classes_per_client must be an integer >= 1, got {k!r}")
    if k > len(groups):
        raise ValueError(f"classes_per_client={k} exceeds the {len(groups)} classes of {key!r}")
    if k * num_clients < len(groups):
        raise ValueError(
            f"classes_per_client={k} x num_clients={num_clients} < {len(groups)} classes of "
            f"{key!r}: some classes would belong to no client"
        )
    return _pathological(groups, num_clients, k, rng)


def _by_task(groups: dict[str, list[int]], num_clients: int, rng: np.random.Generator):
    names = list(groups)
    if num_clients < len(names):  # group whole tasks: largest first onto the smallest client
        order = sorted(rng.permutation(len(names)), key=lambda t: -len(groups[names[t]]))
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for t in order:
            min(parts, key=len).extend(groups[names[t]])
        return _finish(parts)
    counts = [1] * len(names)
    for _ in range(num_clients - len(names)):  # D'Hondt: next client to the largest quotient
        free = [t for t in range(len(names)) if counts[t] < len(groups[names[t]])]
        t = max(free, key=lambda t: len(groups[names[t]]) / (counts[t] + 1))
        counts[t] += 1
    parts = []
    for t, name in enumerate(names):
        parts.extend(np.array_split(rng.permutation(groups[name]), counts[t]))
    return _finish(parts)


def _dirichlet(groups, num_clients, alpha, min_size, rng):
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for name in sorted(groups):
            idx = rng.permutation(groups[name])
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return _finish(parts)
    raise ValueError(
        f"dirichlet: no draw in {MAX_DIRICHLET_DRAWS} gave every client min_size={min_size} "
        f"examples; raise alpha={alpha}, lower min_size or use fewer clients"
    )


def _pathological(groups, num_clients, k, rng):
    names = sorted(groups)
    order = [names[i] for i in rng.permutation(len(names))]
    holders: dict[str, list[int]] = {name: [] for name in names}
    for c in range(num_clients):
        for j in range(k):
            holders[order[(c * k + j) % len(names)]].append(c)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for name, clients in holders.items():
        for c, chunk in zip(clients, np.array_split(rng.permutation(groups[name]), len(clients))):
            parts[c].extend(chunk.tolist())
    return _finish(parts)


# ---------------------------------------------------------------------- generalisation splits
@dataclass
class FederatedSplit:
    """Indices into the examples: per-client train/test, held-out clients and tasks."""

    train: list[list[int]]
    test: list[list[int]]
    held_out_clients: list[int] = field(default_factory=list)
    held_out_tasks: list[str] = field(default_factory=list)
    held_out_task_examples: list[int] = field(default_factory=list)

    @property
    def num_clients(self) -> int:
        return len(self.train)

    @property
    def training_clients(self) -> list[int]:
        """Clients that take part in training (all but the held-out ones)."""
        held = set(self.held_out_clients)
        return [c for c in range(self.num_clients) if c not in held]


def _count(value: float | int, total: int, name: str) -> int:
    if isinstance(value, float):
        if not 0.0 <= value < 1.0 or round(value * total) >= total:
            raise ValueError(f"{name}={value}: the fraction must leave at least one of {total}")
        return round(value * total)
    if value < 0 or value >= total:
        raise ValueError(f"{name}={value} must be >= 0 and < {total}")
    return int(value)


def make_federated_split(
    examples: Sequence[Example],
    scheme: str,
    num_clients: int,
    *,
    test_fraction: float = 0.2,
    held_out_clients: float | int = 0.0,
    held_out_tasks: Sequence[str] | int = (),
    seed: int = 0,
    **partition_options: Any,
) -> FederatedSplit:
    """Partition ``examples`` and add the generalisation splits.

    ``held_out_tasks``: task names, or a number of tasks drawn at random, removed before
    partitioning (evaluate on ``held_out_task_examples`` for unseen tasks).
    ``held_out_clients``: fraction (float) or number (int) of clients never trained on.
    ``test_fraction``: share of each client's examples kept as its local test set (seeded; at
    least one example stays in train). ``partition_options`` go to :func:`partition`.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    seeds = np.random.SeedSequence(seed).spawn(4)
    tasks = list(dict.fromkeys(e.task for e in examples))
    if isinstance(held_out_tasks, (int, np.integer)) and not isinstance(held_out_tasks, bool):
        n_tasks = _count(int(held_out_tasks), len(tasks), "held_out_tasks")
        chosen = np.random.default_rng(seeds[0]).choice(len(tasks), n_tasks, replace=False)
        held_tasks = [tasks[i] for i in sorted(chosen)]
    else:
        held_tasks = list(held_out_tasks)
        unknown = [t for t in held_tasks if t not in tasks]
        if unknown:
            raise ValueError(f"held_out_tasks: unknown task(s) {unknown}; tasks: {tasks}")
        if len(held_tasks) == len(tasks):
            raise ValueError("held_out_tasks: holding out every task leaves nothing to train on")
    held_set = set(held_tasks)
    held_idx = [i for i, e in enumerate(examples) if e.task in held_set]
    keep = [i for i, e in enumerate(examples) if e.task not in held_set]
    sub = partition(
        [examples[i] for i in keep],
        scheme,
        num_clients,
        seed=int(np.random.default_rng(seeds[1]).integers(2**31)),
        **partition_options,
    )
    train, test = [], []
    test_rng = np.random.default_rng(seeds[2])
    for part in sub:
        idx = [keep[i] for i in part]
        n_test = min(round(test_fraction * len(idx)), max(len(idx) - 1, 0))
        perm = test_rng.permutation(len(idx))
        test.append(sorted(idx[i] for i in perm[:n_test]))
        train.append(sorted(idx[i] for i in perm[n_test:]))
    n_held = _count(held_out_clients, num_clients, "held_out_clients")
    held_clients = np.random.default_rng(seeds[3]).choice(num_clients, n_held, replace=False)
    return FederatedSplit(
        train=train,
        test=test,
        held_out_clients=sorted(int(c) for c in held_clients),
        held_out_tasks=held_tasks,
        held_out_task_examples=held_idx,
    )


# --------------------------------------------------------------------------------- summaries
@dataclass
class PartitionSummary:
    """Per-client sizes and histograms of ``key`` ("label" or "task")."""

    key: str
    labels: list[str]
    sizes: list[int]
    histograms: list[dict[str, int]]

    @classmethod
    def from_partition(
        cls, examples: Sequence[Example], parts: Sequence[Sequence[int]], key: str = "task"
    ) -> PartitionSummary:
        """Count ``key`` values per client (examples without a value count as "-")."""
        if key not in ("label", "task"):
            raise ValueError(f"key must be 'label' or 'task', got {key!r}")
        hists = []
        for part in parts:
            counts = Counter(getattr(examples[i], key) or "-" for i in part)
            hists.append(dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))
        labels = sorted({lab for h in hists for lab in h})
        return cls(key, labels, [len(p) for p in parts], hists)

    @property
    def num_clients(self) -> int:
        return len(self.sizes)

    def entropies(self) -> list[float]:
        """Shannon entropy (nats) of each client's ``key`` histogram."""
        out = []
        for h in self.histograms:
            total = sum(h.values())
            out.append(-sum(c / total * math.log(c / total) for c in h.values()) if total else 0.0)
        return out

    def format(self, top: int = 4) -> str:
        """A compact table: one row per client with its size, class count and top classes."""
        width = max(len(str(self.num_clients - 1)), 6)
        rows = [f"{'client':>{width}} {'size':>6} {'#' + self.key:>8}  top {self.key}s"]
        for c, (size, h) in enumerate(zip(self.sizes, self.histograms)):
            tops = " ".join(f"{k}:{v}" for k, v in list(h.items())[:top])
            more = f" (+{len(h) - top})" if len(h) > top else ""
            rows.append(f"{c:>{width}} {size:>6} {len(h):>8}  {tops}{more}")
        s = self.sizes
        rows.append(
            f"{self.num_clients} clients, {sum(s)} examples, size min/mean/max "
            f"{min(s)}/{sum(s) / len(s):.1f}/{max(s)}, {len(self.labels)} {self.key}s"
        )
        return "\n".join(rows)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON or plotting."""
        return {
            "key": self.key,
            "labels": list(self.labels),
            "sizes": list(self.sizes),
            "histograms": [dict(h) for h in self.histograms],
        }
