"""A run directory's own files: the lock, the marker with its manifest, and the JSONL files a
run appends to (read back with a torn last line repaired).

* **Lock**: ``.fedlora.lock``, an exclusive OS file lock (``fcntl.flock``) held for the whole
  run (`hold`): a second run into the same directory is refused while the first runs; the OS
  releases it on any exit of the process, a crash or a kill included.
* **Marker**: ``.fedlora-run.json`` (``{"fedlora_run": 1, "files": [...]}``): a directory is a
  run directory only if it holds one. ``files`` is the manifest: the top-level names fedlora
  wrote there (`claim`); ``--overwrite`` removes those and nothing else
  (`clear_claimed`). A directory that is not empty and holds no marker is not fedlora's: a
  run into it is refused (unless ``allow_nonempty``, and then only if none of the names a run
  writes is there), and so is ``--overwrite`` or ``--resume`` of it.
* **JSONL**: `read_jsonl` parses a file a run appends to; a last line cut short by a crash is
  dropped (it is rewritten on resume), any other bad line names the file and line.
  `rows_record` is what a checkpoint keeps of the rows (their count and SHA-256), and
  `resume_rows` rebuilds the rows from ``metrics.jsonl`` against it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedlora.core.contract import FedLoraError
from fedlora.federation.checkpoint import atomic_write_text
from fedlora.federation.tracking import STATE_FILE as TRACKING_STATE
from fedlora.federation.tracking import TB_DIR

MARKER = ".fedlora-run.json"
LOCK = ".fedlora.lock"
#: every name a run (and ``fedlora run``'s report) may write at the top of its directory
OUTPUT_NAMES = (
    "config.toml",
    "metrics.jsonl",
    "eval_examples.jsonl",
    "summary.json",
    "checkpoint.safetensors",
    "adapter",
    "merged",
    "plots",
    "partition.json",
    "spectrum.json",
    TRACKING_STATE,
    TB_DIR,
)


def _err(run_dir: Path, e: OSError, doing: str) -> FedLoraError:
    why = e.strerror or str(e)
    return FedLoraError(
        f"{run_dir}: cannot {doing}: {why}; choose another --output-dir or fix its permissions"
    )


def is_run_dir(run_dir: Path) -> bool:
    return (run_dir / MARKER).is_file()


def claimed(run_dir: Path) -> list[str]:
    """The manifest: the names fedlora wrote in `run_dir` (none without a marker)."""
    try:
        data = json.loads((run_dir / MARKER).read_text())
        files = data["files"]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FedLoraError(f"{run_dir / MARKER}: damaged run marker ({e})") from None
    if not isinstance(files, list) or not all(
        isinstance(f, str) and f and "/" not in f and f not in (".", "..") for f in files
    ):
        raise FedLoraError(f"{run_dir / MARKER}: damaged run marker (files)")
    return files


def claim(run_dir: Path, *names: str) -> None:
    """Add `names` to the manifest of `run_dir` (creating the marker)."""
    have = claimed(run_dir)
    new = [n for n in names if n not in have]
    if new or not is_run_dir(run_dir):
        text = json.dumps({"fedlora_run": 1, "files": have + new}, indent=1) + "\n"
        atomic_write_text(run_dir / MARKER, text)


def held_run_files(run_dir: Path) -> list[str]:
    """The claimed names that are there (a directory holds a run if any is)."""
    return [n for n in claimed(run_dir) if (run_dir / n).exists() or (run_dir / n).is_symlink()]


def clear_claimed(run_dir: Path, log: logging.Logger) -> None:
    """Remove what fedlora wrote in `run_dir` (its manifest), and nothing else."""
    removed = []
    for name in held_run_files(run_dir):
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(name)
    claim(run_dir)  # the manifest stays: the same names are written again
    if removed:
        log.info("overwrite: removed %s from %s", ", ".join(removed), run_dir)


class RunLock:
    """An exclusive lock on a run directory (see the module docstring); `release` it, or let
    the process exit."""

    def __init__(self, run_dir: Path) -> None:
        import fcntl

        self.run_dir = run_dir
        try:
            self._f = open(run_dir / LOCK, "a+")  # noqa: SIM115 - held for the run
        except OSError as e:
            raise _err(run_dir, e, "write there") from None
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._f.seek(0)
            pid = self._f.read().strip()
            self._f.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise _err(run_dir, e, "lock it") from None
            raise FedLoraError(
                f"{run_dir} is in use by another fedlora run (pid {pid or '?'}); wait for it "
                "to finish or choose another --output-dir"
            ) from None
        self._f.truncate(0)
        self._f.write(f"{os.getpid()}\n")
        self._f.flush()

    def release(self) -> None:
        if not self._f.closed:
            self._f.close()  # closing the file releases the lock


def hold(
    run_dir: Path, *, resume: bool, overwrite: bool, allow_nonempty: bool = False
) -> RunLock:
    """Lock `run_dir` for a run (creating it) after refusing what is not fedlora's: a file, a
    non-empty directory without a marker (see the module docstring). The caller checks, with
    the lock held, whether it holds a run (`held_run_files`)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FedLoraError(f"{run_dir}: exists and is not a directory; choose another --output-dir")
    foreign = _foreign_entries(run_dir)
    if foreign:
        what = ", ".join(sorted(foreign)[:4]) + (" ..." if len(foreign) > 4 else "")
        if resume or overwrite or not allow_nonempty:
            raise FedLoraError(
                f"{run_dir} is not empty ({what}) and is not a fedlora run directory (no "
                f"{MARKER}): fedlora neither resumes, overwrites nor writes into it; choose "
                "an empty or new --output-dir"
                + ("" if resume or overwrite else " (or pass --allow-nonempty)")
            )
        clash = [n for n in OUTPUT_NAMES if n in foreign]
        if clash:
            raise FedLoraError(
                f"{run_dir}: --allow-nonempty, but it holds {', '.join(clash)}, which a run "
                "writes; move them or choose another --output-dir"
            )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _err(run_dir, e, "create it") from None
    lock = RunLock(run_dir)
    try:
        if not is_run_dir(run_dir):
            claim(run_dir)
    except OSError as e:
        lock.release()
        raise _err(run_dir, e, "write there") from None
    except BaseException:
        lock.release()
        raise
    return lock


def _foreign_entries(run_dir: Path) -> list[str]:
    """The entries of a directory without a marker (ours, the lock, do not count)."""
    if not run_dir.is_dir() or is_run_dir(run_dir):
        return []
    return [p.name for p in run_dir.iterdir() if p.name != LOCK]


# -- JSONL ---------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file a run appends to; a torn last line (a crash mid-append) is
    dropped, any other line that is not a JSON object raises `FedLoraError` naming it."""
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().decode("utf-8", errors="strict").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FedLoraError(f"{path}: unreadable ({e})") from None
    rows = []
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    for k, (i, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if k == len(numbered) - 1:  # torn by a crash: rewritten when the run resumes
                break
            raise FedLoraError(f"{path}, line {i}: not valid JSON ({e})") from None
        rows.append(row)
    return rows


def _digest(rows: Iterable[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update((json.dumps(r) + "\n").encode())
    return h.hexdigest()


def rows_record(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a checkpoint keeps of the metrics rows: their count and SHA-256."""
    return {"count": len(rows), "sha256": _digest(rows)}


def resume_rows(path: Path, record: Any) -> list[dict[str, Any]]:
    """The first ``record["count"]`` rows of ``metrics.jsonl`` (`path`), checked against the
    checkpoint's `rows_record`; rows after them (a round the checkpoint missed) are dropped."""
    if not (isinstance(record, dict) and isinstance(record.get("count"), int)):
        raise FedLoraError(f"{path.parent}: the checkpoint's rows record is damaged")
    rows = read_jsonl(path)[: record["count"]]
    if len(rows) < record["count"] or _digest(rows) != record.get("sha256"):
        raise FedLoraError(
            f"{path}: does not match the checkpoint (holds {len(rows)} of its "
            f"{record['count']} rows, or they were edited); restore it or start again with "
            "--overwrite"
        )
    return rows
