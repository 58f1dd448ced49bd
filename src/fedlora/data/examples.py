"""Examples: the built-in multi-task data set and loaders for users' own data."""

from __future__ import annotations

import csv
import functools
import gzip
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

LOG = logging.getLogger("fedlora.data")
FIELDS = ("task", "instruction", "input", "output", "label")
CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (131,072 characters) cuts long texts
FILE_SUFFIXES = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class Example:
    """One instruction example; ``label`` is set for classification tasks, else ``None``."""

    task: str
    instruction: str
    input: str
    output: str
    label: str | None = None


@dataclass(frozen=True)
class TaskInfo:
    """Description of a built-in task."""

    name: str
    kind: str  # "generation" | "classification"
    labels: tuple[str, ...] = field(default_factory=tuple)
    size: int = 0
    source: str = ""
    description: str = ""


def _read_gz_jsonl(name: str) -> list[dict[str, Any]]:
    ref = resources.files("fedlora.data").joinpath(name)
    with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


#: the built-in task sets: ``<set>.jsonl.gz`` and ``<set>_tasks.jsonl.gz`` in this package.
#: "builtin" is the default; "builtin_large" holds tasks loaded only when named.
DEFAULT_SET, LARGE_SET = "builtin", "builtin_large"


@functools.lru_cache(maxsize=2)
def _builtin_examples(name: str = DEFAULT_SET) -> tuple[Example, ...]:
    return tuple(Example(**row) for row in _read_gz_jsonl(f"{name}.jsonl.gz"))


@functools.lru_cache(maxsize=2)
def _builtin_tasks(name: str = DEFAULT_SET) -> tuple[TaskInfo, ...]:
    return tuple(
        TaskInfo(**{**row, "labels": tuple(row["labels"])})
        for row in _read_gz_jsonl(f"{name}_tasks.jsonl.gz")
    )


def builtin_tasks(large: bool = False) -> list[TaskInfo]:
    """Describe the tasks of the built-in data set (see docs/data.md); with ``large``, the
    larger tasks that load only when named (e.g. ``wn_lexname``) follow."""
    return list(_builtin_tasks()) + (list(_builtin_tasks(LARGE_SET)) if large else [])


def load_builtin(tasks: Sequence[str] | None = None) -> list[Example]:
    """Load the built-in examples, optionally only those of ``tasks`` (in file order).

    Without ``tasks``: the default set's 27 tasks. A named task may also be one of the larger
    tasks (``builtin_tasks(large=True)``), which are read from their own file only then.
    """
    if tasks is None:
        return list(_builtin_examples())
    if isinstance(tasks, str):
        tasks = [tasks]
    default = {t.name for t in _builtin_tasks()}
    large = {t.name for t in _builtin_tasks(LARGE_SET)}
    unknown = [t for t in tasks if t not in default | large]
    if unknown:
        valid = [t.name for t in builtin_tasks(large=True)]
        raise ValueError(f"unknown built-in task(s) {unknown}; valid names: {', '.join(valid)}")
    wanted = set(tasks)
    out = [e for e in _builtin_examples() if e.task in wanted]
    if wanted & large:
        out += [e for e in _builtin_examples(LARGE_SET) if e.task in wanted]
    return out


# ------------------------------------------------------------------------------ user data
def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Read a JSON/JSONL/CSV/TSV/Parquet file into row dicts; ValueError names the file."""
    kind = FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"{path}: unsupported file type {path.suffix!r}; use one of "
            f"{', '.join(sorted(FILE_SUFFIXES))} or a datasets.load_dataset name"
        )
    try:
        if kind == "jsonl":
            return _jsonl_text(path, path.read_text(encoding="utf-8"))
        if kind == "json":
            text = path.read_text(encoding="utf-8")
            if not text.strip():
                return []
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                return _jsonl_text(path, text)  # JSON lines saved as .json
            if isinstance(data, dict):  # {"data": [...]} or a column-oriented dict
                lists = {k: v for k, v in data.items() if isinstance(v, list)}
                if len(lists) == 1:
                    data = next(iter(lists.values()))
                elif lists and len({len(v) for v in lists.values()}) == 1:
                    n = len(next(iter(lists.values())))
                    data = [{k: v[i] for k, v in lists.items()} for i in range(n)]
                else:
                    data = [data]
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of objects")
            return data
        if kind in ("csv", "tsv"):
            csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))  # long texts
            with open(path, encoding="utf-8", newline="") as fh:
                return list(csv.DictReader(fh, delimiter="\t" if kind == "tsv" else ","))
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(
                f"{path}: reading Parquet needs pyarrow (pip install pyarrow)"
            ) from None
        return pq.read_table(path).to_pylist()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read {kind} file ({e})") from None


def _jsonl_text(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: invalid JSON ({e.msg})") from None
    return rows


def _load_dataset_rows(name: str, split: str, kwargs: Mapping[str, Any]) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{name!r} is not an existing file; loading it as a Hugging Face dataset needs "
            "`pip install datasets`"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split, **kwargs)
    except Exception as e:  # datasets raises many types; report them in one line
        raise ValueError(
            f"could not load dataset {name!r} (split {split!r}): {type(e).__name__}: {e}"
        ) from None
    return list(ds)


def _text(value: Any, where: str, field_name: str) -> str:
    """A text field's value: a string of valid Unicode; a missing value (None, NaN) is empty;
    a number is text except in ``output`` (a label's class id, a numeric input); a bool, a
    list or an object is refused, naming `where` and the field."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and field_name != "output":
        return str(value)
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: {field_name!r} must be text, got {type(value).__name__} {value!r:.40}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{where}: {field_name!r} holds invalid Unicode ({e.reason} at character {e.start})"
        ) from None
    return value


def load_examples(
    source: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    *,
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    task: str | None = None,
    **load_kwargs: Any,
) -> list[Example]:
    """Load examples from a file, a ``datasets.load_dataset`` name, or an iterable of rows.

    ``source``: a ``.json``/``.jsonl``/``.csv``/``.tsv``/``.parquet`` path; otherwise a name
    passed to ``datasets.load_dataset(source, split=split, **load_kwargs)`` (e.g.
    ``load_examples("json", data_files="x.jsonl")``); or rows (list of dicts, a ``Dataset``).
    ``columns`` maps our fields (task, instruction, input, output, label) to source columns;
    unmapped fields use the column of the same name when present. Required: ``instruction`` or
    ``input``, and ``output`` or ``label`` (a missing output is set to the label). ``task``
    overrides the task of every example (default: the task column, else the file/dataset name).
    """
    columns = dict(columns or {})
    bad = [k for k in columns if k not in FIELDS]
    if bad:
        raise ValueError(f"columns: unknown field(s) {bad}; our fields are {', '.join(FIELDS)}")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            what, default_task = str(path), path.stem.split(".")[0]
            rows = _read_rows(path)
        elif path.suffix.lower() in FILE_SUFFIXES or os.sep in str(source):
            raise FileNotFoundError(f"data file not found: {path}")
        else:
            what, default_task = f"dataset {source!r}", str(source).rsplit("/", 1)[-1]
            rows = _load_dataset_rows(str(source), split, load_kwargs)
    else:
        what, default_task = "the given rows", "custom"
        rows = list(source)
    if not rows:
        raise ValueError(f"{what}: no examples (the data is empty)")
    if not all(isinstance(r, Mapping) for r in rows):
        raise ValueError(f"{what}: expected records (objects with named columns)")
    available = list(rows[0].keys())
    for ours, theirs in columns.items():
        if theirs not in available:
            raise ValueError(
                f"{what}: column {theirs!r} (mapped to {ours!r}) not found; "
                f"available columns: {available}"
            )
    col = {f: columns.get(f, f if f in available else None) for f in FIELDS}
    if col["instruction"] is None and col["input"] is None:
        raise ValueError(
            f"{what}: no 'instruction' or 'input' column; available columns: {available}; "
            "map one with columns={'input': '<column>'}"
        )
    if col["output"] is None and col["label"] is None:
        raise ValueError(
            f"{what}: no 'output' or 'label' column; available columns: {available}; "
            "map one with columns={'output': '<column>'}"
        )
    out = []
    for n, row in enumerate(rows):
        missing = [c for c in col.values() if c is not None and c not in row]
        if missing:
            raise ValueError(f"{what}: row {n} has no column {missing[0]!r}")
        get = {f: (_text(row[c], f"{what}, row {n}", f) if c is not None else "")
               for f, c in col.items()}  # fmt: skip
        label = get["label"] if col["label"] is not None and row[col["label"]] is not None else None
        if col["output"] is not None and row[col["output"]] is None and label is None:
            raise ValueError(f"{what}, row {n}: 'output' is null (and there is no label)")
        out.append(
            Example(
                task=task or get["task"] or default_task,
                instruction=get["instruction"],
                input=get["input"],
                output=get["output"] or (label or ""),
                label=label,
            )
        )
    _warn_empty(out, what)
    return out


def _warn_empty(examples: Sequence[Example], what: str) -> None:
    """Say so when examples carry no text at all (empty prompt and output: a column mapping
    gone wrong, a file of blanks): they train on nothing but the template."""
    empty = [i for i, e in enumerate(examples) if not (e.instruction or e.input or e.output)]
    if empty:
        LOG.warning(
            "%s: %d of %d rows have empty instruction, input and output (first: row %d); "
            "check the columns (data.columns) or the file",
            what, len(empty), len(examples), empty[0],
        )  # fmt: skip
