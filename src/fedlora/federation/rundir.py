"""A run directory (the in-process engine's; any engine's that keeps one): refusing to
clobber a run, clearing one on ``overwrite``, checking that a checkpoint belongs to the
configuration, and the JSONL files a run appends to. The lock, the marker and its manifest
are `fedlora.federation.runfiles`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fedlora.core.contract import FedLoraError
from fedlora.federation.checkpoint import (
    CHECKPOINT,
    atomic_write_text,
    load_checkpoint,
    remove_stale_temp,
)
from fedlora.federation.config import ConfigError, ExperimentConfig, diff, from_dict, to_dict
from fedlora.federation.runfiles import (
    OUTPUT_NAMES,
    clear_claimed,
    held_run_files,
    read_jsonl,
    wrote,
)


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over one that is there, unless told to resume or overwrite
    (called with the directory locked, `fedlora.federation.runfiles.hold`)."""
    if resume and overwrite:
        raise ConfigError("resume and overwrite: choose one (continue the run, or replace it)")
    held = held_run_files(run_dir)
    if held and not resume and not overwrite:
        raise FedLoraError(
            f"{run_dir} already holds a run ({', '.join(held)}); continue it with "
            f"`fedlora run --resume {run_dir}`, replace it with --overwrite, or choose another "
            "--output-dir"
        )


def open_run_dir(
    cfg: ExperimentConfig,
    *,
    resume: bool,
    overwrite: bool,
    log: logging.Logger,
    run_dir: Path | None = None,
) -> dict[str, Any] | None:
    """With the run directory (`run_dir`, default `cfg`'s) locked: refuse what may not be
    done to it, remove the
    temporary files a killed run left, and return the checkpoint to resume from (None: a new
    run; ``overwrite`` has removed the old run's files, and only those).

    ``resume`` of a directory whose checkpoint is gone while its ``metrics.jsonl`` holds rows
    is refused: starting again at round 1 would rewrite them (issue 27)."""
    run_dir = Path(cfg.output_dir) if run_dir is None else run_dir
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    removed = remove_stale_temp(run_dir, OUTPUT_NAMES)
    if removed:
        log.info("removed %d temporary file(s) a killed run left in %s", len(removed), run_dir)
    state = load_checkpoint(run_dir) if resume else None
    if resume and state is None:
        rows = read_jsonl(run_dir / "metrics.jsonl")
        if rows:
            raise FedLoraError(
                f"{run_dir}: cannot resume: {CHECKPOINT} is missing but metrics.jsonl holds "
                f"{len(rows)} rows, which a restart would rewrite; restore the checkpoint, or "
                "start again with --overwrite"
            )
        log.info("no checkpoint in %s: starting from round 1", run_dir)
    if state is not None:
        check_resumable(state, cfg, run_dir)
    elif overwrite:
        clear_run_dir(run_dir, log)
    return state


def clear_run_dir(run_dir: Path, log: logging.Logger) -> None:
    """Remove what an earlier run wrote in `run_dir` (``overwrite``: its manifest), and nothing
    else."""
    clear_claimed(run_dir, log)


def check_resumable(state: dict[str, Any], cfg: ExperimentConfig, run_dir: Path) -> None:
    """The checkpoint in `run_dir` was written by this configuration (`rounds` may grow)."""
    saved = from_dict(state["config"])
    # trackers may be added or changed on resume: they do not change the run; and
    # parallel_clients is how clients share the hardware, not what they compute
    ignore = ("output_dir", "threads", "rounds", "tracking", "train.parallel_clients")
    changed = diff(saved, cfg, ignore=ignore)
    if cfg.rounds < int(state["round"]):
        raise ConfigError(
            f"rounds = {cfg.rounds}: the checkpoint in {run_dir} is already at round "
            f"{state['round']}; resume with rounds >= {state['round']} or use a new output_dir"
        )
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir}: the configuration differs from the checkpointed "
            f"one in {', '.join(changed)} (checkpointed: "
            + ", ".join(f"{k} = {_get(saved, k)!r}" for k in changed[:3])
            + "); use the original values or a new output_dir"
        )


class Jsonl:
    """An append-only JSONL file, rewritten from `rows` when opened (and claimed as the run's)."""

    def __init__(self, path: Path, rows: list[dict[str, Any]]) -> None:
        self.path = path
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        wrote(path.parent, path)

    def append(self, row: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full disk: name the file (a torn line is repaired on resume)
            if not e.errno or e.filename is not None:
                raise
            raise OSError(e.errno, e.strerror, str(self.path)) from None


def rows_before(path: Path, start: int) -> list[dict[str, Any]]:
    """The rows of a JSONL file from rounds before `start` (a resumed run rewrites the rest)."""
    if start <= 1:
        return []
    return [r for r in read_jsonl(path) if isinstance(r.get("round"), int) and r["round"] < start]


def _get(cfg: Any, dotted: str) -> Any:
    node: Any = to_dict(cfg)
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
