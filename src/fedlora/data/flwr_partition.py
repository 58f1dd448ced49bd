"""flwr-datasets partitioners over fedlora examples (``data.partitioner``).

``data.partitioner = "flwr_datasets:DirichletPartitioner"`` with ``data.partitioner_options =
{alpha = 0.5}`` splits the clients' data with Flower's partitioner instead of fedlora's own
(`fedlora.data.partition`). The examples become a `datasets.Dataset` with the columns
``label`` (the example's label, "-" when it has none), ``task`` and ``index``; the partitioner
gets ``num_partitions = data.num_clients``, ``partition_by`` (default: ``"label"`` when every
example has one, else ``"task"``, as fedlora's partitioners choose their key) and ``seed``
(the split's seed) unless the options set them; each client's examples are
``partitioner.load_partition(i)["index"]``.

Unlike fedlora's partitioners, a Flower partitioner may leave examples out (e.g.
``ShardPartitioner`` without ``keep_incomplete_shard``, or a class ``PathologicalPartitioner``
gives no client); they are simply not used. Partitioners that split columns
(``Vertical*Partitioner``) are refused.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from fedlora.data.examples import Example

PREFIX = "flwr_datasets:"
COLUMNS = ("label", "task", "index")
SET_BY_FEDLORA = ("num_partitions",)  # from data.num_clients


def partitioner_class(name: str) -> type:
    """The flwr-datasets partitioner class ``"flwr_datasets:<Class>"`` names; a `ValueError`
    naming ``data.partitioner`` otherwise."""
    if not name.startswith(PREFIX) or not name[len(PREFIX) :].isidentifier():
        raise ValueError(
            f"data.partitioner = {name!r}: expected 'flwr_datasets:<Partitioner class>', e.g. "
            "'flwr_datasets:DirichletPartitioner'"
        )
    try:
        import flwr_datasets.partitioner as module
    except ImportError as e:
        raise ValueError(
            f"data.partitioner = {name!r}: flwr-datasets is not installed ({e}); "
            "pip install 'fedlora[flower]'"
        ) from None
    cls_name = name[len(PREFIX) :]
    names = sorted(n for n in dir(module) if n.endswith("Partitioner") and n != "Partitioner")
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, module.Partitioner)) or cls_name not in names:
        hint = difflib.get_close_matches(cls_name, names, n=1)
        raise ValueError(
            f"data.partitioner = {name!r}: flwr_datasets has no partitioner {cls_name!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
            + f" (partitioners: {', '.join(names)})"
        )
    if cls_name.startswith("Vertical"):
        raise ValueError(
            f"data.partitioner = {name!r}: splits columns (vertical FL), not examples; use a "
            "horizontal partitioner such as DirichletPartitioner"
        )
    return cls


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters
    return {k: p for k, p in params.items() if k != "self"}


def partitioner_problems(name: str | None, options: Mapping[str, Any]) -> list[str]:
    """Configuration problems of ``data.partitioner`` / ``data.partitioner_options`` (one line
    each, naming the key); [] when fine or when no partitioner is set."""
    if name is None:
        return ["data.partitioner_options: set data.partitioner too"] if options else []
    try:
        params = _parameters(partitioner_class(name))
    except ValueError as e:
        return [str(e)]
    p = []
    for key in options:
        if key in SET_BY_FEDLORA:
            p.append(f"data.partitioner_options.{key}: set from data.num_clients; remove it")
        elif key not in params:
            hint = difflib.get_close_matches(key, list(params), n=1)
            p.append(
                f"data.partitioner_options.{key}: {name} has no option {key!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" (options: {', '.join(k for k in params if k not in SET_BY_FEDLORA)})"
            )
    pb = options.get("partition_by")
    if pb is not None and pb not in COLUMNS:
        p.append(
            f"data.partitioner_options.partition_by = {pb!r}: the columns are "
            f"{', '.join(COLUMNS[:2])}"
        )
    required = [
        k
        for k, q in params.items()
        if q.default is inspect.Parameter.empty
        and q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)
        and k not in (*SET_BY_FEDLORA, "partition_by")
        and k not in options
    ]
    if required:
        p.append(f"data.partitioner_options: {name} needs {', '.join(required)}")
    return p


def examples_dataset(examples: Sequence[Example]):
    """fedlora examples as a `datasets.Dataset` with the columns label, task and index."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "label": [e.label if e.label is not None else "-" for e in examples],
            "task": [e.task for e in examples],
            "index": list(range(len(examples))),
        }
    )


class FlwrPartitioner:
    """A flwr-datasets partitioner as a fedlora partition scheme: called as
    ``scheme(examples, num_clients, seed)`` by `fedlora.data.partition`, returns each
    client's example indices."""

    def __init__(self, name: str, options: Mapping[str, Any] | None = None) -> None:
        problems = partitioner_problems(name, dict(options or {}))
        if problems:
            raise ValueError(problems[0])
        self.name = name
        self.cls = partitioner_class(name)
        self.options = dict(options or {})

    def build(self, examples: Sequence[Example], num_clients: int, seed: int):
        """The configured partitioner instance (not yet given the data)."""
        params = _parameters(self.cls)
        kwargs = dict(self.options)
        if "num_partitions" in params:
            kwargs["num_partitions"] = num_clients
        if "partition_by" in params and "partition_by" not in kwargs:
            every = all(e.label is not None for e in examples)
            kwargs["partition_by"] = "label" if every else "task"
        if "seed" in params and "seed" not in kwargs:
            kwargs["seed"] = int(seed)
        try:
            return self.cls(**kwargs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"data.partitioner = {self.name!r}: {e}") from None

    def __call__(self, examples: Sequence[Example], num_clients: int, seed: int) -> list[list[int]]:
        part = self.build(examples, num_clients, seed)
        part.dataset = examples_dataset(examples)
        try:
            n = part.num_partitions
            if n != num_clients:
                raise ValueError(
                    f"made {n} partitions but data.num_clients = {num_clients}; make them agree"
                )
            out = [sorted(int(i) for i in part.load_partition(c)["index"]) for c in range(n)]
        except (ValueError, KeyError, IndexError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"data.partitioner = {self.name!r}: {first}") from None
        seen: set[int] = set()
        for c, idx in enumerate(out):
            if seen & set(idx):
                raise ValueError(
                    f"data.partitioner = {self.name!r}: client {c} shares examples with another "
                    "client; fedlora needs disjoint partitions"
                )
            seen |= set(idx)
        return out
