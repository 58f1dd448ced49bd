"""Round checkpoints: atomic writes, a format that cannot run code, and every RNG state, so a
resumed run is bit-identical.

A checkpoint is one file, ``<run_dir>/checkpoint.safetensors``: the tensors of the state
(strategy state, RNG states) in safetensors, and everything else (round number, configuration,
the count and SHA-256 of the metrics rows so far, which stay in ``metrics.jsonl``, the
structure that says where each tensor goes) as JSON in the file's metadata, with a SHA-256
of the tensors (names, dtypes, shapes, bytes) and of that JSON (``fedlora_sha256``): a
damaged file is refused by name (`load_checkpoint`), and what it holds is checked before use
(`check_state`: round >= 0, finite strategy tensors, well-formed RNG states). Its size does
not grow with the rounds. Loading it parses data only: nothing in it is executed, unlike a
pickle. The state may nest dicts, lists and tuples of tensors, numpy arrays, numbers,
strings and instances of the allow-listed classes (`LoraFactors`, `LowRankSum`; see
`register_checkpoint_type`); anything else is refused when saving, naming where it is.

The file is written to a temporary file in the same directory, flushed and fsync'ed, then
moved over the old one with `os.replace` (atomic on POSIX and Windows) and the directory is
fsync'ed: a crash at any point leaves either the previous checkpoint or the new one, never a
torn file. Leftover temporary files of a killed writer are removed by `remove_stale_temp`.

File permissions: every file fedlora writes is created as ``0o666`` minus the process umask,
like any file the user creates (temporary files start private and get that mode before they
are renamed into place): keep a run private with ``umask 077`` or a private directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.core.contract import FedLoraError, LoraFactors
from fedlora.core.linalg import LowRankSum

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # pickle, fedlora < 0.2: never loaded
FORMAT = 2
TAG = "__fedlora__"  # marks an encoded node in the JSON tree


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()


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
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno and e.filename is None:  # a full disk: name it
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def remove_stale_temp(
    directory: str | os.PathLike, names: tuple[str, ...] | None = None
) -> list[Path]:
    """Remove the temporary files `atomic_write_bytes` leaves when its process is killed
    (``.<name>.<random>.tmp``; only those of `names` when given); returns them. Call it only
    where no other writer is active."""
    d = Path(directory)
    if not d.is_dir():
        return []
    stale = [
        p
        for p in d.glob(".*.tmp")
        if p.is_file() and (names is None or p.name[1:].rsplit(".", 2)[0] in names)
    ]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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


# -- encoding: tensors apart, the rest as JSON -----------------------------------------------

#: class name -> (class, to plain state, from plain state); plain state is any encodable tree
_TYPES: dict[str, tuple[type, Callable[[Any], Any], Callable[[Any], Any]]] = {}


def register_checkpoint_type(
    cls: type,
    to_state: Callable[[Any], Any] | None = None,
    from_state: Callable[[Any], Any] | None = None,
) -> type:
    """Allow instances of `cls` in checkpoints. By default their ``vars()`` are saved and
    restored into an instance made without calling ``__init__``."""

    def default_from(state: dict[str, Any]) -> Any:
        obj = object.__new__(cls)
        obj.__dict__.update(state)
        return obj

    _TYPES[cls.__qualname__] = (cls, to_state or vars, from_state or default_from)
    return cls


register_checkpoint_type(LoraFactors)
register_checkpoint_type(LowRankSum)


def _encode(x: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = x.detach().cpu().contiguous().clone()
        return {TAG: "tensor", "key": key}
    if isinstance(x, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(x).copy())
        return {TAG: "ndarray", "key": key, "dtype": str(x.dtype)}
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, (list, tuple)):
        items = [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(x)]
        return items if isinstance(x, list) else {TAG: "tuple", "items": items}
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x) and TAG not in x:
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in x.items()}
        return {
            TAG: "dict",
            "items": [
                [_encode(k, tensors, f"{where} key"), _encode(v, tensors, f"{where}[{k!r}]")]
                for k, v in x.items()
            ],
        }
    entry = _TYPES.get(type(x).__qualname__)
    if entry is not None and type(x) is entry[0]:
        state = _encode(entry[1](x), tensors, where)
        return {TAG: "object", "type": type(x).__qualname__, "state": state}
    raise TypeError(
        f"checkpoint: {where} is a {type(x).__name__}, which a checkpoint cannot hold (use "
        "tensors, numbers, strings, lists and dicts, or fedlora.federation.checkpoint."
        "register_checkpoint_type)"
    )


def _decode(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    if not isinstance(x, dict):
        return x
    kind = x.get(TAG)
    if kind is None:
        return {k: _decode(v, tensors) for k, v in x.items()}
    if kind == "tensor":
        return tensors[x["key"]]
    if kind == "ndarray":
        return tensors[x["key"]].numpy().astype(x["dtype"], copy=False)
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in x["items"])
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in x["items"]}
    if kind == "object" and x.get("type") in _TYPES:
        return _TYPES[x["type"]][2](_decode(x["state"], tensors))
    raise ValueError(f"unknown entry {kind!r}")


def encode_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors by key, JSON of everything else) for a state tree."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "state")
    return tensors, json.dumps(tree)


def decode_state(tensors: dict[str, torch.Tensor], text: str) -> dict[str, Any]:
    return _decode(json.loads(text), tensors)


def checksum(tensors: dict[str, torch.Tensor], text: str) -> str:
    """SHA-256 of the tensors (by key: dtype, shape, bytes) and the metadata JSON."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(text.encode())
    return h.hexdigest()


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write `state` (a tree of the types the module docstring lists) as the run's
    checkpoint, with its checksum."""
    from safetensors.torch import save

    path = checkpoint_path(run_dir)
    tensors, text = encode_state({"format": FORMAT, **state})
    data = save(tensors, metadata={"fedlora": text, "fedlora_sha256": checksum(tensors, text)})
    atomic_write_bytes(path, lambda f: f.write(data))
    return path


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's last checkpoint, or None when there is none. A corrupt, foreign or old-format
    file raises `FedLoraError` naming it; nothing in the file is ever executed."""
    from safetensors.torch import load

    d = Path(run_dir)
    path = d / CHECKPOINT
    if not path.is_file():
        if (d / LEGACY_CHECKPOINT).is_file():
            raise FedLoraError(
                f"{d / LEGACY_CHECKPOINT}: written by an older fedlora (a pickle, which this "
                "version never loads because unpickling can run code); it cannot be resumed: "
                "start again with --overwrite or another output_dir"
            )
        return None
    try:
        data = path.read_bytes()
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len])["__metadata__"]
        text, digest = meta["fedlora"], meta.get("fedlora_sha256")
        if digest is not None and digest != checksum(tensors, text):
            raise FedLoraError(
                f"{path}: checksum mismatch (damaged); start again with --overwrite or another "
                "output_dir"
            )
        state = decode_state(tensors, text)
    except FedLoraError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, name the file
        raise FedLoraError(
            f"{path}: not a readable fedlora checkpoint (truncated, corrupt or foreign: "
            f"{type(e).__name__}: {str(e)[:120]}); start again with --overwrite or another "
            "output_dir"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else None
        raise FedLoraError(f"{path}: unknown checkpoint format {got!r} (expected {FORMAT})")
    if digest is None:
        raise FedLoraError(
            f"{path}: no checksum (written by an older fedlora, or edited); start again with "
            "--overwrite or another output_dir"
        )
    check_state(state, path)
    return state


def check_state(state: dict[str, Any], path: Path) -> None:
    """What a checkpoint holds, checked before it is used (`FedLoraError` naming `path` and
    the entry): the round a number >= 0, and where present the running totals counts, every
    float of the strategy finite, the RNG states well-formed (tried on fresh generators)."""
    rnd = state.get("round")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise FedLoraError(f"{path}: round = {rnd!r}, expected an integer >= 0 (damaged)")
    totals = state.get("totals", {})
    if not isinstance(totals, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in totals.values()
    ):
        raise FedLoraError(f"{path}: totals = {totals!r}, expected counts >= 0 (damaged)")
    bad = _non_finite(state.get("strategy"), "strategy")
    if bad is not None:
        raise FedLoraError(f"{path}: {bad} holds NaN or Inf (damaged)")
    try:
        if "rng" in state:
            _try_rng_state(state["rng"])
    except Exception as e:  # noqa: BLE001 - any malformed RNG state is a damaged file
        raise FedLoraError(f"{path}: malformed RNG state ({type(e).__name__}: {e})") from None


def _non_finite(x: Any, where: str) -> str | None:
    """The path of the first non-finite float tensor or number in `x`, else None."""
    if isinstance(x, torch.Tensor):
        ok = not x.is_floating_point() or bool(torch.isfinite(x).all())
        return None if ok else where
    if isinstance(x, float):
        return None if math.isfinite(x) else where
    if isinstance(x, dict):
        items = x.items()
    elif isinstance(x, (list, tuple)):
        items = enumerate(x)
    elif type(x).__qualname__ in _TYPES:
        items = vars(x).items()
    else:
        return None
    for k, v in items:
        bad = _non_finite(v, f"{where}.{k}")
        if bad is not None:
            return bad
    return None


def _try_rng_state(state: dict[str, Any]) -> None:
    """Raise unless `state` (from `rng_state`) loads into fresh generators."""
    random.Random().setstate(state["python"])
    np.random.RandomState().set_state(state["numpy"])
    torch.Generator().set_state(state["torch"])
    for kind, s in state["generators"].values():
        if kind == "numpy":
            np.random.default_rng().bit_generator.state = s
        elif kind == "torch":
            torch.Generator().set_state(s)
        else:
            raise ValueError(f"unknown generator kind {kind!r}")


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
