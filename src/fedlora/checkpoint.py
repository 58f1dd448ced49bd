"""Round checkpoints: atomic writes and every RNG state, so a resumed run is bit-identical.

A checkpoint is one file, ``<run_dir>/checkpoint.pt``, holding a dict (strategy state, RNG
states, round number, metrics rows so far, the resolved configuration, ...). It is written to a
temporary file in the same directory, flushed and fsync'ed, then moved over the old one with
`os.replace` (atomic on POSIX and Windows) and the directory is fsync'ed: a crash at any point
leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT


def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temporary file next to `path`, fsync it, then replace `path`.

    If `write` raises, the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write `state` (any picklable dict; tensors welcome) as the run's checkpoint."""
    path = checkpoint_path(run_dir)
    payload = {"format": FORMAT, **state}
    atomic_write_bytes(path, lambda f: torch.save(payload, f))
    return path


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's last checkpoint, or None when there is none."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        return None
    # our own file: it holds strategy objects (LowRankSum, LoraFactors), not only tensors
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    return state


# -- RNG states -----------------------------------------------------------------------------


def rng_state(**generators: Any) -> dict[str, Any]:
    """Python, numpy (global) and torch (global) RNG states, plus the named engine generators
    (`numpy.random.Generator` or `torch.Generator`)."""
    out: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.random.get_rng_state(),
        "generators": {},
    }
    for name, g in generators.items():
        if isinstance(g, np.random.Generator):
            out["generators"][name] = ("numpy", g.bit_generator.state)
        elif isinstance(g, torch.Generator):
            out["generators"][name] = ("torch", g.get_state())
        else:
            raise TypeError(f"rng_state: {name} is a {type(g).__name__}, not a generator")
    return out


def set_rng_state(state: dict[str, Any], **generators: Any) -> None:
    """Restore what `rng_state` saved, into the global RNGs and the given generators."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    for name, g in generators.items():
        kind, s = state["generators"][name]
        if kind == "numpy":
            g.bit_generator.state = s
        else:
            g.set_state(s)
