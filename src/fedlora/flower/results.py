"""The ServerApp's result folder: a run directory as the in-process engine keeps one.

The folder (run config ``result-dir``, else the experiment's ``output_dir``) is locked for the
run, marked, and its manifest lists each file the app wrote (`fedlora.federation.runfiles`);
one that already holds a run is refused unless the run config says ``resume = true``
(continue it) or ``overwrite = true`` (remove the files of its manifest first, nothing
else). After every round the app appends the round's record to ``metrics.jsonl`` and writes
``checkpoint.safetensors`` (`fedlora.federation.checkpoint`): the strategy's state, the norm
history (`fedlora.federation.rounds.server_state`), the client sampler's RNG, the running
totals, the privacy ledger, the evaluation records. A ServerApp killed at any moment and
started again with ``resume = true`` continues after the last checkpointed round (Flower
counts its rounds from 1 again: `FlowerStrategy.round_offset`). The ``[tracking]`` section
of the experiment logs every round, as in ``fedlora run``. At the end (however the run ends)
``result.json``, ``global_delta.pt`` and ``config.toml`` are written atomically.

Everything here reuses the federation core's run-directory code (`open_run_dir`, `Jsonl`,
`resume_rows`, `save_checkpoint`): one implementation for both engines.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from fedlora.federation import rounds
from fedlora.federation.checkpoint import (
    CHECKPOINT,
    atomic_write_bytes,
    atomic_write_text,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fedlora.federation.config import dumps_toml, to_dict
from fedlora.federation.rundir import Jsonl, open_run_dir
from fedlora.federation.runfiles import hold, resume_rows, rows_record, write_output, wrote
from fedlora.federation.tracking import RunTracker
from fedlora.flower.strategy import FlowerStrategy

LOG = logging.getLogger("fedlora.flower")
METRICS = "metrics.jsonl"


def flag(value: Any) -> bool:
    """A run-config boolean (``true``, ``"true"``, ``1``)."""
    return str(value).strip().lower() in ("1", "true", "yes")


class ResultDir:
    """The result folder of one ServerApp run (see the module docstring): `open` it before
    ``fs.start``, `close` it after, in a ``finally``."""

    def __init__(self, fs: FlowerStrategy, *, resume: bool, overwrite: bool) -> None:
        self.fs, self.dir = fs, Path(fs.result_dir)
        self.resume, self.overwrite = resume, overwrite
        self.rows: list[dict[str, Any]] = []
        self.lock: Any = None
        self.metrics: Jsonl | None = None
        self.tracker: RunTracker | None = None

    def open(self) -> int:
        """Lock the folder, check it, restore a checkpoint (``resume``); the rounds done."""
        fs, cfg = self.fs, self.fs.experiment
        self.lock = hold(self.dir, resume=self.resume, overwrite=self.overwrite)
        try:
            state = open_run_dir(
                cfg, resume=self.resume, overwrite=self.overwrite, log=LOG, run_dir=self.dir
            )
            if state is not None:
                self._restore(state)
            write_output(self.dir, "config.toml", lambda p: atomic_write_text(p, dumps_toml(cfg)))
            self.metrics = Jsonl(self.dir / METRICS, self.rows)
            self.tracker = RunTracker(
                cfg.tracking, self.dir, name=cfg.name, log=LOG,
                tags={"strategy": cfg.strategy.name, "seed": str(cfg.seed), "engine": "flower"},
            )  # fmt: skip
            self.tracker.start(cfg, [_round_row(r) for r in self.rows], resumed=state is not None)
        except BaseException:
            self.lock.release()
            raise
        fs.on_round_end = self.round_end
        return fs.round_offset

    def _restore(self, state: dict[str, Any]) -> None:
        fs = self.fs
        fs.strategy.load_state_dict(state["strategy"])
        set_rng_state(state["rng"], sampler=fs.sampler)
        rounds.load_server_state(fs.server, state.get("server", {}))
        fs.totals = dict(state["totals"])
        if fs.server.ledger is not None:
            fs.server.ledger.load_state_dict(state.get("privacy", {}))
            rounds.sync_privacy(fs.server)
        self.rows = resume_rows(self.dir / METRICS, state["rows"])
        fs.rounds = [dict(r) for r in self.rows]
        fs.eval_rounds = [dict(r) for r in state.get("eval_rounds") or []]
        fs.round_offset = int(state["round"])
        LOG.info("fedlora: resuming %s after round %d", self.dir, fs.round_offset)

    def round_end(self, rnd: int) -> None:
        """After round `rnd`'s aggregation: its record to ``metrics.jsonl``, the checkpoint,
        the trackers."""
        fs = self.fs
        # as it reads back from the file; under privacy without per-client values
        public = rounds.public_result({"rounds": [fs.rounds[-1]]}, fs.privacy)["rounds"][0]
        record = json.loads(json.dumps(public))
        self.rows.append(record)
        assert self.metrics is not None
        self.metrics.append(record)
        save_checkpoint(
            self.dir,
            {
                "round": rnd,
                "strategy": fs.strategy.state_dict(),
                "rng": rng_state(sampler=fs.sampler),
                "rows": rows_record(self.rows),
                "server": rounds.server_state(fs.server),
                "totals": dict(fs.totals),
                "config": to_dict(fs.experiment),
                "privacy": fs.server.ledger.state_dict() if fs.server.ledger is not None else {},
                "eval_rounds": json.loads(json.dumps(fs.eval_rounds)),
            },
        )
        wrote(self.dir, self.dir / CHECKPOINT)
        if self.tracker is not None:
            self.tracker.log_round(rnd, [_round_row(record)])

    def close(self, failed: bool) -> None:
        """Write the results (atomically), close the trackers, release the lock."""
        try:
            if self.metrics is not None:  # opened: the folder is ours
                write_result(self.fs, self.dir)
            if self.tracker is not None:
                self.tracker.log_artifacts([self.dir / "result.json"])
                self.tracker.close(failed=failed)
        finally:
            if self.lock is not None:
                self.lock.release()


def _round_row(record: dict[str, Any]) -> dict[str, Any]:
    """The engine-shaped round row of a record (what trackers log)."""
    return {k: v for k, v in record.items() if not isinstance(v, dict) or k == "metrics"}


def write_result(fs: FlowerStrategy, result_dir: str | Path) -> None:
    """``result.json`` (per round: clients used, dropped replies with reasons, metrics),
    ``global_delta.pt`` (the final global delta as scale-1 factors ``{module: (A, B)}``) and
    ``config.toml``, each written atomically (a crash leaves the previous file or the new
    one, never a cut one) and recorded in the folder's manifest when it is a run directory."""
    d = Path(result_dir)
    d.mkdir(parents=True, exist_ok=True)
    delta = fs.strategy.global_delta() if any(r["aggregated"] for r in fs.rounds) else {}
    cfg = fs.experiment
    result = {
        "strategy": fs.strategy.name,
        "experiment": cfg.name,
        "nodes": {
            str(n): {"client_id": s.client_id, "ranks": dict(s.ranks)} for n, s in fs.specs.items()
        },
        "rejected": {str(n): why for n, why in fs.rejected.items()},
        "rounds": fs.rounds,
        "evaluate": fs.eval_rounds,
        "global_delta_fro": {m: float(f.delta().norm()) for m, f in delta.items()},
    }
    if fs.privacy is not None:
        result["privacy"] = fs.privacy.summary()
        result["privacy_ledger"] = fs.privacy.state_dict()  # every client's history
    # under privacy: no secret, no per-client unnoised values (`rounds.public_result`);
    # serialised before any file is touched: a failure leaves them as they were
    text = json.dumps(rounds.public_result(result, fs.privacy), indent=1)
    tensors = {m: (f.A, f.B) for m, f in delta.items()}
    files = {
        "global_delta.pt": lambda p: atomic_write_bytes(p, lambda f: torch.save(tensors, f)),
        "result.json": lambda p: atomic_write_text(p, text),
        "config.toml": lambda p: atomic_write_text(p, dumps_toml(cfg)),
    }
    marked = (d / ".fedlora-run.json").is_file()
    for name, write in files.items():
        if marked:
            write_output(d, name, write)
        else:
            write(d / name)
