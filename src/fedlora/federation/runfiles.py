"""A run directory's own files: the lock, the marker with its manifest, and the JSONL files a
run appends to (read back with a torn last line repaired).

* **Lock**: an exclusive OS lock (``fcntl.flock``) on the run directory itself, held for the
  whole run (`hold`): a second run into the same directory is refused while the first runs;
  the OS releases it on any exit of the process, a crash or a kill included. ``.fedlora.lock``
  only tells the holder's pid: deleting it does not unlock the directory (it did when the
  lock was on that file: issue 27).
* **Marker**: ``.fedlora-run.json`` (``{"fedlora_run": 2, "files": [...]}``): a directory is a
  run directory only if it holds one. ``files`` is the manifest: the paths (relative, file by
  file, ``adapter/adapter_model.safetensors``) fedlora wrote there, each added after it was
  written (`wrote`, `wrote_tree`); ``--overwrite`` removes those files, then the directories
  they leave empty, and nothing else (`clear_claimed`): a user's ``plots/fig1.png`` or
  ``merged/`` in a run directory stays. A directory that is not empty and holds no marker is
  not fedlora's: a run into it is refused (unless ``allow_nonempty``, and then only if none of
  the names a run writes is there), and so is ``--overwrite`` or ``--resume`` of it.
* **Modes**: every file fedlora writes there ends ``0o666`` minus the umask, every directory
  it creates ``0o777`` minus the umask (`wrote` sets them, whatever the writer made).
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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fedlora.core.contract import FedLoraError
from fedlora.federation.checkpoint import FILE_MODE, _umask, atomic_write_text

MARKER = ".fedlora-run.json"
LOCK = ".fedlora.lock"
#: what the trackers write in a run directory (`fedlora.federation.tracking`)
TRACKING_STATE = "tracking.json"
TB_DIR = "tensorboard"
DIR_MODE = 0o777 & ~_umask()  # a directory fedlora creates, like ``mkdir``'s
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
    """The manifest: the paths fedlora wrote in `run_dir`, relative to it (none without a
    marker)."""
    try:
        data = json.loads((run_dir / MARKER).read_text())
        files = data["files"]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FedLoraError(f"{run_dir / MARKER}: damaged run marker ({e})") from None
    if not isinstance(files, list) or not all(_relative(f) for f in files):
        raise FedLoraError(f"{run_dir / MARKER}: damaged run marker (files)")
    return files


def _relative(name: object) -> bool:
    """A manifest entry: a relative path inside the run directory."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def claim(run_dir: Path, *names: str) -> None:
    """Add `names` (paths relative to `run_dir`) to its manifest (creating the marker)."""
    have = claimed(run_dir)
    new = [n for n in dict.fromkeys(names) if n not in have]
    if new or not is_run_dir(run_dir):
        _write_manifest(run_dir, have + new)


def _write_manifest(run_dir: Path, files: list[str]) -> None:
    if not all(_relative(f) for f in files):
        raise FedLoraError(f"{run_dir}: not a path inside the run directory: {files!r}")
    text = json.dumps({"fedlora_run": 2, "files": files}, indent=1) + "\n"
    atomic_write_text(run_dir / MARKER, text)


def wrote(run_dir: Path, *paths: Path) -> None:
    """Record files fedlora just wrote under `run_dir`: their mode becomes `FILE_MODE` (a
    library may create them private: safetensors did), and they join the manifest."""
    names = []
    for p in paths:
        os.chmod(p, FILE_MODE)
        names.append(p.relative_to(run_dir).as_posix())
    claim(run_dir, *names)


def write_output(run_dir: Path, name: str, write: Callable[[Path], object]) -> list[Path]:
    """Call ``write(path)`` for the file or folder `name` of `run_dir` and record what it
    wrote (`wrote`; in a folder, `wrote_tree`: a user's files there are not claimed); a
    folder it created gets `DIR_MODE`. Returns the files recorded."""
    target = run_dir / name
    existed = target.exists()
    before = snapshot(target)
    write(target)
    if not target.is_dir():
        wrote(run_dir, target)
        return [target]
    if not existed:
        os.chmod(target, DIR_MODE)
    return wrote_tree(run_dir, target, before)


Snapshot = dict[str, tuple[int, int, int]]


def snapshot(directory: Path) -> Snapshot:
    """The files under `directory` (relative path -> inode, size, mtime): compared after a
    write by `wrote_tree`, to tell what the writer wrote from what was there."""
    if not directory.is_dir():
        return {}
    out = {}
    for p in directory.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[p.relative_to(directory).as_posix()] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def wrote_tree(run_dir: Path, directory: Path, before: Snapshot) -> list[Path]:
    """`wrote` for the files under `directory` that a writer created or replaced since
    `before` (`snapshot`); files that were there untouched (a user's) are not claimed."""
    after = snapshot(directory)
    new = [directory / rel for rel, sig in sorted(after.items()) if before.get(rel) != sig]
    wrote(run_dir, *new)
    return new


def held_run_files(run_dir: Path) -> list[str]:
    """The claimed paths that are there (a directory holds a run if any is)."""
    return [n for n in claimed(run_dir) if (run_dir / n).exists() or (run_dir / n).is_symlink()]


def clear_claimed(run_dir: Path, log: logging.Logger) -> None:
    """Remove the files fedlora wrote in `run_dir` (its manifest), then the directories they
    leave empty, and nothing else. An entry that is a directory (a manifest of fedlora before
    issue 27 listed ``plots``, ``adapter``) is not removed: what is in it is not known to be
    fedlora's; the log says so."""
    removed, kept, dirs = [], [], set()
    for name in held_run_files(run_dir):
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            kept.append(name)
            continue
        p.unlink()
        removed.append(name)
        dirs.update(q for q in Path(name).parents if str(q) != ".")
    for d in sorted(dirs, key=lambda q: -len(q.parts)):
        try:
            (run_dir / d).rmdir()  # only if empty: a user's files in it stay
        except OSError:
            pass
    _write_manifest(run_dir, kept)
    if removed:
        log.info("overwrite: removed %s from %s", ", ".join(removed), run_dir)
    if kept:
        log.warning(
            "overwrite: left %s in %s (an older fedlora listed the folder, not its files; "
            "remove it yourself if it is the old run's)",
            ", ".join(kept),
            run_dir,
        )


class RunLock:
    """An exclusive lock on a run directory (see the module docstring); `release` it, or let
    the process exit."""

    def __init__(self, run_dir: Path) -> None:
        import fcntl

        self.run_dir = run_dir
        try:
            self._fd: int | None = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as e:
            raise _err(run_dir, e, "open it") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.release()
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise _err(run_dir, e, "lock it") from None
            try:
                pid = (run_dir / LOCK).read_text().strip()
            except (OSError, UnicodeDecodeError):
                pid = ""
            raise FedLoraError(
                f"{run_dir} is in use by another fedlora run (pid {pid or '?'}); wait for it "
                "to finish or choose another --output-dir"
            ) from None
        try:  # who holds it, for the message above
            with open(run_dir / LOCK, "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as e:
            self.release()
            raise _err(run_dir, e, "write there") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


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
