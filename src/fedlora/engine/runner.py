"""The in-process engine: one base model, many simulated clients, any strategy.

`run_experiment(cfg)` builds the federation once (`fedlora.federation.build`: data, split,
model, clients' ranks, strategy, all seeded), then runs each round as a loop of named steps,
the round's own steps being the federation core's (`fedlora.federation.rounds`), which the
Flower engine calls too:

1. `rounds.draw`: the round's clients (seeded; under DP from the server's secret);
2. `fedlora.engine.training.train_clients`: configure each client's payload
   (`rounds.configure`) and train it on the single `LoraHost` (peft wrappers cached per rank
   configuration; ``train.parallel_clients`` clients at once) when the aggregation asks for
   its update, as a stream of `rounds.Reply`;
3. `rounds.close_round`: check each reply, screen the norms, aggregate, account privacy and
   write the round row;
4. `Federation.evaluate_global` on schedule; 5. `checkpoint`; 6. `report_round`.

A client that raises, reports a non-finite loss or sends an update failing a check or a bound
is dropped for the round, with its reason in the round row (``dropped``) and in
``summary.json``; ``robust.fatal_drops`` makes the first drop stop the run, and an
aggregation error stops it (`fedlora.federation.rounds`). Per round the server holds only the
round's updates (streamed when no relative bound needs the whole round).

Run directory (``cfg.output_dir``): ``config.toml`` (resolved), ``metrics.jsonl`` (one row per
round with ``kind="round"`` and one per evaluated client set with ``kind="eval"``),
``eval_examples.jsonl`` (per evaluated round and set, the per-example values behind the
metrics: `fedlora.clients.evaluate.example_columns` plus ``example``, the examples' indices),
``summary.json``, ``checkpoint.safetensors``, ``adapter/`` (the final global delta as a peft
adapter) and, with ``model.save_merged``, ``merged/``; the directory is locked, marked and its
files listed (`fedlora.federation.runfiles`).

Keys of rows starting with ``time_`` or ``mem_`` are measurements; everything else is
deterministic for a configuration, and a resumed run reproduces it exactly.
"""

from __future__ import annotations

import json
import logging
import os
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.clients.device import precision_name
from fedlora.core.contract import ClientSpec, ClientUpdate, Strategy
from fedlora.engine.training import train_clients
from fedlora.federation import rounds
from fedlora.federation.build import Federation, build_federation, set_threads
from fedlora.federation.checkpoint import (
    CHECKPOINT,
    atomic_write_text,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fedlora.federation.config import ExperimentConfig, dumps_toml, to_dict, validate_config
from fedlora.federation.rundir import Jsonl, open_run_dir, rows_before
from fedlora.federation.runfiles import hold, resume_rows, rows_record, write_output, wrote
from fedlora.federation.tracking import RunTracker

LOG = logging.getLogger("fedlora.engine")
EVAL_SETS = ("seen_clients", "unseen_clients", "unseen_tasks")
MEASURED = ("time_", "mem_")
EXAMPLES_FILE = "eval_examples.jsonl"
OnUpdate = Callable[[int, ClientSpec, ClientUpdate], "ClientUpdate | None"]


@dataclass
class RunResult:
    """What `run_experiment` returns."""

    run_dir: Path
    config: ExperimentConfig
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    strategy: Strategy
    specs: list[ClientSpec] = field(default_factory=list)
    partition: Any = None  # the split's `fedlora.data.PartitionSummary`

    def eval_rows(self, eval_set: str = "seen_clients") -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] == "eval" and r["set"] == eval_set]

    def round_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] == "round"]


def deterministic(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without its measurements (times, memory)."""
    return {k: v for k, v in row.items() if not k.startswith(MEASURED)}


class RunStopped(RuntimeError):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a callback to stop a run after a round's checkpoint (tests, budgets)."""


# -- the engine's own steps --------------------------------------------------------------------


def checkpoint(fed: Federation, run_dir: Path, rnd: int, sampler, rows, totals) -> None:
    """Step 5: everything needed to resume after round `rnd` (`fedlora.federation.checkpoint`)."""
    save_checkpoint(
        run_dir,
        {
            "round": rnd,
            "strategy": fed.strategy.state_dict(),
            "rng": rng_state(sampler=sampler),
            "rows": rows_record(rows),  # the rows are in metrics.jsonl: a flat checkpoint
            "server": rounds.server_state(fed.server),
            "totals": totals,
            "config": to_dict(fed.cfg),
            "privacy": fed.ledger.state_dict() if fed.ledger is not None else {},
            # the simulated clients' own secret (local DP-SGD noise): theirs, not the server's
            "clients_secret": format(fed.clients.secret, "x"),
        },
    )
    wrote(run_dir, run_dir / CHECKPOINT)


def report_round(log, cfg, row: dict[str, Any], eval_rows, bar) -> None:
    """Step 6: one log line (`fedlora.federation.rounds.round_line`) and the progress bar."""
    log.info("%s", rounds.round_line(row, cfg.rounds, eval_rows))
    if bar is not None:
        loss = row["train_loss"]
        bar.set_postfix(loss="-" if loss is None else f"{loss:.3f}")
        bar.update(1)


# -- the run --------------------------------------------------------------------------------


@dataclass
class _Run:
    """A run in progress: the federation, the client sampler, the rows and running totals,
    and the files it appends to."""

    fed: Federation
    run_dir: Path
    sampler: np.random.Generator
    rows: list[dict[str, Any]]
    totals: dict[str, int]
    start: int
    metrics: Jsonl | None = None
    per_example: Jsonl | None = None
    resumed: bool = False


def _open(cfg: ExperimentConfig, resume: bool, overwrite: bool, log) -> _Run:
    """Check the run directory, build the federation and restore a checkpoint (``resume``)."""
    run_dir = Path(cfg.output_dir)
    state = open_run_dir(cfg, resume=resume, overwrite=overwrite, log=log)  # locked by the caller
    threads = set_threads(cfg.threads)
    t_setup = time.perf_counter()
    fed = build_federation(cfg)
    sampler = rounds.make_sampler(cfg.seed, fed.ledger)
    run = _Run(fed, run_dir, sampler, [], rounds.new_totals(), 1)
    if state is not None:
        fed.strategy.load_state_dict(state["strategy"])
        set_rng_state(state["rng"], sampler=run.sampler)
        rounds.load_server_state(fed.server, state.get("server", {}))
        run.rows = resume_rows(run_dir / "metrics.jsonl", state["rows"])
        run.totals = dict(state["totals"])
        if fed.ledger is not None:  # its secret, sigma and clip norm: the mechanism's too
            fed.ledger.load_state_dict(state.get("privacy", {}))
            rounds.sync_privacy(fed.server)
        if "clients_secret" in state:
            fed.clients.secret = int(str(state["clients_secret"]), 16)
        run.start, run.resumed = int(state["round"]) + 1, True
        log.info("resuming %s after round %d", run_dir, state["round"])
    atomic_write_text(run_dir / "config.toml", dumps_toml(cfg))
    wrote(run_dir, run_dir / "config.toml")
    run.metrics = Jsonl(run_dir / "metrics.jsonl", run.rows)
    run.per_example = Jsonl(
        run_dir / EXAMPLES_FILE, rows_before(run_dir / EXAMPLES_FILE, run.start)
    )
    if fed.ledger is not None and fed.ledger.seeded:
        log.warning("privacy.insecure_seeded_noise = true: this run is NOT private")
    where, c = fed.clients.where, fed.clients
    log.info(
        "%s: %s on %s (%s, %s, %s weights), %d clients (%d train, %d per round), %d modules, "
        "%d threads, setup %.1fs",
        cfg.name, cfg.strategy.name, cfg.model.name, where.device, precision_name(where.compute),
        str(where.storage).replace("torch.", ""), len(c.specs), len(c.train_clients),
        cfg.sampled_per_round(), len(c.host.module_names()), threads,
        time.perf_counter() - t_setup,
    )  # fmt: skip
    return run


def _round(run: _Run, rnd: int, on_update, progress: bool, profile_memory: bool):
    """One round: sample, train and close (the federation core), evaluate; returns the round
    row (with its times) and the evaluation rows."""
    fed = run.fed
    t0 = time.perf_counter()
    tally = rounds.RoundTally()
    chosen = rounds.draw(
        fed.server, run.sampler, fed.clients.train_clients, fed.cfg.sampled_per_round(), tally
    )
    cbar = _bar(progress, len(chosen), 1, leave=False, desc=f"round {rnd}", unit="client")
    if profile_memory:
        tracemalloc.start()
    fed.strategy.begin_round(rnd)
    replies = train_clients(fed, rnd, chosen, tally, on_update, cbar)
    row = rounds.close_round(fed.server, rnd, replies, tally, run.totals)
    mem: dict[str, float] = {}
    if profile_memory:
        mem["mem_aggregate_peak_bytes"] = float(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        mem["mem_rss_mb"] = _rss_mb()
    if cbar is not None:
        cbar.close()
    t2 = time.perf_counter()
    examples_rows: list[dict[str, Any]] = []
    eval_rows = []
    if rnd % fed.cfg.eval.every == 0 or rnd == fed.cfg.rounds:
        eval_rows = fed.evaluate_global(rnd, examples_rows)
    for r in examples_rows:
        run.per_example.append(r)
    t3 = time.perf_counter()
    row.update(
        # aggregation time excludes the clients' training, done inside the stream
        time_train=tally.t_train,
        time_aggregate=t2 - t0 - tally.t_train,
        time_eval=t3 - t2,
        time_round=t3 - t0,
        **mem,
    )
    return row, eval_rows


def _finish(run: _Run, result: RunResult, save_final: bool) -> None:
    """summary.json, and the final adapter (and merged model) of the run."""
    fed, cfg = run.fed, run.fed.cfg
    result.summary = rounds.run_summary(
        cfg, run.rows, run.totals, fed.server.full_ft, fed.specs, len(fed.clients.train_clients)
    )
    if fed.ledger is not None:
        result.summary["privacy"] = fed.ledger.summary()
    text = json.dumps(result.summary, indent=2) + "\n"
    write_output(run.run_dir, "summary.json", lambda p: atomic_write_text(p, text))
    if not save_final:
        return
    delta = fed.strategy.global_delta()
    if any(f.rank > 0 for f in delta.values()):
        host, dense, tok = fed.clients.host, fed.strategy.dense, fed.clients.tokenizer
        write_output(run.run_dir, "adapter", lambda p: host.save_adapter(delta, p, None, dense))
        if cfg.model.save_merged:
            write_output(run.run_dir, "merged", lambda p: host.merge_and_save(delta, p, tok, dense))


def run_experiment(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    allow_nonempty: bool = False,
    progress: bool = True,
    log: logging.Logger | None = None,
    on_update: OnUpdate | None = None,
    on_round_end: Callable[[int, RunResult], None] | None = None,
    profile_memory: bool = False,
    save_final: bool = True,
    tracker: RunTracker | None = None,
) -> RunResult:
    """Run (or with ``resume=True`` continue) the experiment `cfg`; see the module docstring.

    The directory is locked for the run; one that already holds a run is refused unless
    ``resume`` or ``overwrite`` (which removes the files of its manifest first), a non-empty
    one that is not a run directory unless ``allow_nonempty`` (`fedlora.federation.runfiles`).
    ``on_update(round, spec, update)`` sees every client
    update before it is checked and aggregated, and may return a replacement (fault
    injection); ``on_round_end(round, result)`` runs after each round's checkpoint (raise
    `RunStopped` to stop there). ``profile_memory`` records the peak traced Python
    allocations of the round's streamed aggregation (clients train inside the stream, one at
    a time) (``mem_aggregate_peak_bytes``) and the process RSS (``mem_rss_mb``) in each round
    row. ``tracker`` (`fedlora.federation.tracking.RunTracker`; default: the one
    ``cfg.tracking`` asks for, closed at the end) gets the config, every round and the summary
    and adapter.
    """
    log = log or LOG
    validate_config(cfg)
    # the run directory, locked until the run ends, however it ends
    lock = hold(
        Path(cfg.output_dir), resume=resume, overwrite=overwrite, allow_nonempty=allow_nonempty
    )
    bar = tracking = None
    try:
        run = _open(cfg, resume, overwrite, log)
        fed = run.fed
        result = RunResult(
            run.run_dir, cfg, run.rows, {}, fed.strategy, fed.specs, fed.clients.partition_summary()
        )
        tracking = tracker or RunTracker.for_config(cfg, log=log)
        tracking.start(cfg, run.rows, resumed=run.resumed)
        on_update = tracking.wrap_on_update(on_update)
        bar = _bar(progress, cfg.rounds, run.start)
        for rnd in range(run.start, cfg.rounds + 1):
            row, eval_rows = _round(run, rnd, on_update, progress, profile_memory)
            for r in (row, *eval_rows):
                run.rows.append(r)
                run.metrics.append(r)
            checkpoint(fed, run.run_dir, rnd, run.sampler, run.rows, run.totals)
            tracking.log_round(rnd, [row, *eval_rows])
            report_round(log, cfg, row, eval_rows, bar)
            if on_round_end is not None:
                on_round_end(rnd, result)
        _finish(run, result, save_final)
        tracking.log_summary(result.summary, cfg.rounds)
        tracking.log_artifacts([run.run_dir / "adapter", run.run_dir / "summary.json"])
        if tracker is None:
            tracking.close()
    except BaseException:
        if tracking is not None and tracker is None:  # ours: failed (RunStopped resumes it)
            tracking.close(failed=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        lock.release()
    return result


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bar(progress: bool, total: int, start: int, **kwargs):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    kwargs.setdefault("desc", "rounds")
    kwargs.setdefault("unit", "round")
    return tqdm(total=total, initial=start - 1, dynamic_ncols=True, **kwargs)
