"""The in-process engine: one base model, many simulated clients, any strategy.

`run_experiment(cfg)` loads the model once, builds the federated split and the clients'
ranks (seeded), builds the strategy from the host's module shapes, then each round samples
clients (seeded, without replacement), trains each one in turn on the single `LoraHost`
(peft wrappers cached per rank configuration), aggregates, evaluates the global model on
schedule and checkpoints. Per round the server holds only the round's updates: nothing grows
with the number of clients except their small specs (ranks per module).

Run directory (``cfg.output_dir``): ``config.toml`` (resolved), ``metrics.jsonl`` (one row per
round with ``kind="round"`` and one per evaluated client set with ``kind="eval"``),
``summary.json``, ``checkpoint.pt``, ``adapter/`` (the final global delta as a peft adapter)
and, with ``model.save_merged``, ``merged/``.

Keys of rows starting with ``time_`` or ``mem_`` are measurements; everything else is
deterministic for a configuration, and a resumed run reproduces it exactly.
"""

from __future__ import annotations

import json
import logging
import os
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fedlora.config import (
    ConfigError,
    ExperimentConfig,
    diff,
    dumps_toml,
    from_dict,
    to_dict,
    validate_config,
)
from fedlora.contract import (
    ClientSpec,
    ClientUpdate,
    Strategy,
    payload_nbytes,
    update_nbytes,
)
from fedlora.device import precision_name
from fedlora.engine.tiny import TINY_MODELS, build_tiny

LOG = logging.getLogger("fedlora.engine")
EVAL_SETS = ("seen_clients", "unseen_clients", "unseen_tasks")
MEASURED = ("time_", "mem_")


@dataclass
class RunResult:
    """What `run_experiment` returns."""

    run_dir: Path
    config: ExperimentConfig
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    strategy: Strategy
    specs: list[ClientSpec] = field(default_factory=list)

    def eval_rows(self, eval_set: str = "seen_clients") -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] == "eval" and r["set"] == eval_set]

    def round_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] == "round"]


def deterministic(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without its measurements (times, memory)."""
    return {k: v for k, v in row.items() if not k.startswith(MEASURED)}


class RunStopped(RuntimeError):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a callback to stop a run after a round's checkpoint (tests, budgets)."""


# -- setup ----------------------------------------------------------------------------------


def set_threads(threads: int) -> int:
    """torch intra-op threads: `threads`, or all cores the process may use when 0."""
    if threads <= 0:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            threads = os.cpu_count() or 1
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


@dataclass(frozen=True)
class Placement:
    """Where and how a client computes: the resolved ``train.device``, the autocast dtype of
    ``train.precision`` and the base weights' storage dtype (``model.dtype``)."""

    device: torch.device
    compute: torch.dtype
    storage: torch.dtype


def placement(cfg: ExperimentConfig) -> Placement:
    """Resolve ``train.device`` / ``train.precision`` / ``model.dtype``; an unavailable device
    is a `FedLoraError` naming it, raised before anything is loaded."""
    from fedlora.device import resolve_device, resolve_dtype, resolve_precision

    device = resolve_device(cfg.train.device)
    compute = resolve_precision(cfg.train.precision, device)
    return Placement(device, compute, resolve_dtype(cfg.model.dtype, compute))


def load_base_model(cfg: ExperimentConfig, num_labels: int | None = None, where=None):
    """``(model, tokenizer)`` for ``cfg.model`` (tiny random models included), on the device
    and in the dtype of `placement` (`where`, resolved here when None)."""
    where = where or placement(cfg)
    m = cfg.model
    if m.name in TINY_MODELS:
        model, tok = build_tiny(m.name, m.kind, num_labels)
        return model.to(where.device, where.storage), tok
    from fedlora.models import load_model

    return load_model(
        m.name,
        m.kind,
        num_labels,
        where.storage,
        device=where.device,
        quantization=m.quantization,
        compute_dtype=where.compute,
    )


def build_host(cfg: ExperimentConfig, model):
    """The `LoraHost` of ``cfg.model`` on `model` (the engine's and the Flower ClientApp's)."""
    from fedlora.models import LoraHost, default_target_modules

    return LoraHost(
        model,
        cfg.model.target_modules or default_target_modules(model),
        lora_dropout=cfg.model.dropout,
        rslora=cfg.model.rslora,
        alpha=cfg.model.alpha,
    )


def train_config(cfg: ExperimentConfig):
    """The clients' `fedlora.client.TrainConfig`: ``cfg.train`` with the experiment's seed."""
    from fedlora.client import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in to_dict(cfg.train).items() if k in names}, seed=cfg.seed)


def load_data(cfg: ExperimentConfig):
    """The examples of ``cfg.data`` (held-out tasks included)."""
    from fedlora.data import load_builtin, load_examples

    d = cfg.data
    if d.source == "builtin":
        return load_builtin(d.tasks)
    examples = load_examples(d.source, columns=d.columns or None)
    if d.tasks is not None:
        wanted = set(d.tasks)
        examples = [e for e in examples if e.task in wanted]
        if not examples:
            raise ConfigError(f"data.tasks: none of {d.tasks} is in {d.source}")
    return examples


def build_split(cfg: ExperimentConfig, examples):
    from fedlora.data import make_federated_split

    d = cfg.data
    scheme = "by_task" if d.partition == "natural" else d.partition
    split = make_federated_split(
        examples,
        scheme,
        d.num_clients,
        test_fraction=d.test_fraction,
        held_out_clients=cfg.num_heldout_clients(),
        held_out_tasks=list(d.heldout_tasks),
        seed=cfg.seed,
        alpha=d.dirichlet_alpha,
        classes_per_client=d.classes_per_client,
    )
    if d.max_examples_per_client is not None:
        rng = np.random.default_rng([cfg.seed, 17])
        k = d.max_examples_per_client
        split.train = [
            sorted(rng.choice(idx, k, replace=False).tolist()) if len(idx) > k else idx
            for idx in split.train
        ]
    return split


def _custom_types(n: int, shares: Sequence[float], seed: int) -> list[int]:
    """Exact counts per type by largest remainders, in a seeded order."""
    total = sum(shares)
    raw = [n * s / total for s in shares]
    counts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: -(raw[i] - counts[i]))[: n - sum(counts)]:
        counts[i] += 1
    out = [t + 1 for t, c in enumerate(counts) for _ in range(c)]
    np.random.default_rng([seed, 23]).shuffle(out)
    return out


def client_specs(cfg: ExperimentConfig, modules: Sequence[str], shapes, sizes) -> list[ClientSpec]:
    """Every client's `ClientSpec`: ranks from its resource type (seeded)."""
    from fedlora.resources import RANK_TYPES, RankType, assign_resources, resource_ranks

    r = cfg.resources
    n = cfg.data.num_clients
    if r.distribution == "custom":
        types: list[Any] = _custom_types(n, r.custom_share or [], cfg.seed)
    else:
        kwargs: dict[str, Any] = {"seed": cfg.seed}
        if r.share is not None:
            kwargs["share"] = r.share
        if r.homogeneous_type is not None:
            kwargs["homogeneous_type"] = r.homogeneous_type
        types = assign_resources(n, r.distribution, **kwargs)
    rank_types = dict(RANK_TYPES)
    if r.ranks is not None or r.mlp_ranks is not None:
        attn = r.ranks or [RANK_TYPES[t].attention for t in sorted(RANK_TYPES)]
        mlp = r.mlp_ranks or r.ranks or [RANK_TYPES[t].mlp for t in sorted(RANK_TYPES)]
        rank_types = {t + 1: RankType(a, b) for t, (a, b) in enumerate(zip(attn, mlp))}
    specs = []
    cache: dict[Any, dict[str, int]] = {}
    for i, t in enumerate(types):
        if r.homogeneous_rank is not None:
            ranks = {m: r.homogeneous_rank for m in modules}
        else:
            key = t if isinstance(t, int) else repr(t)
            if key not in cache:
                raw = resource_ranks(
                    t,
                    list(modules),
                    divisor=r.rank_divisor,
                    cap_fraction=r.rank_cap_fraction,
                    dims=shapes,
                    default_kind="attention",
                    rank_types=rank_types,
                )
                cache[key] = {m: min(k, *shapes[m]) for m, k in raw.items()}
            ranks = cache[key]
        specs.append(
            ClientSpec(
                client_id=str(i),
                ranks=ranks,
                alpha=cfg.model.alpha,
                rslora=cfg.model.rslora,
                num_examples=max(1, len(sizes[i])),
                resource_type=t if isinstance(t, int) else None,
            )
        )
    return specs


def build_strategy(cfg: ExperimentConfig, shapes, specs: Sequence[ClientSpec]) -> Strategy:
    import fedlora.strategies as registry

    options = dict(cfg.strategy.options)
    if cfg.strategy.name == "lora_a2":
        options.setdefault("global_rank", max(max(s.ranks.values()) for s in specs))
        options.setdefault("alpha", cfg.model.alpha)
        options.setdefault("rslora", cfg.model.rslora)
    return registry.get(cfg.strategy.name, seed=cfg.seed, shapes=shapes, **options)


def _subset(indices: Sequence[int], k: int, seed: int, salt: int) -> list[int]:
    if len(indices) <= k:
        return list(indices)
    rng = np.random.default_rng([seed, salt])
    return sorted(rng.choice(np.asarray(indices), k, replace=False).tolist())


def eval_sets(cfg: ExperimentConfig, split) -> dict[str, list[int]]:
    """Example indices of each evaluated client set (fixed, seeded subsets)."""
    e = cfg.eval
    out: dict[str, list[int]] = {}
    held = set(split.held_out_clients)
    if e.seen_clients:
        idx = [i for c in split.training_clients for i in split.test[c]]
        if idx:
            out["seen_clients"] = _subset(idx, e.max_examples, cfg.seed, 31)
    if e.unseen_clients and held:
        idx = sorted(i for c in held for i in split.train[c] + split.test[c])
        out["unseen_clients"] = _subset(idx, e.max_examples, cfg.seed, 37)
    if e.unseen_tasks and split.held_out_task_examples:
        out["unseen_tasks"] = _subset(split.held_out_task_examples, e.max_examples, cfg.seed, 41)
    return out


def full_ft_nbytes(shapes) -> int:
    """Bytes of a float32 full fine-tuning update of the same modules (one way)."""
    return sum(d_out * d_in * 4 for d_out, d_in in shapes.values())


# -- the run --------------------------------------------------------------------------------


class _Jsonl:
    def __init__(self, path: Path, rows: list[dict[str, Any]]) -> None:
        self.path = path
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_experiment(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    log: logging.Logger | None = None,
    on_update: Callable[[int, ClientSpec, ClientUpdate], None] | None = None,
    on_round_end: Callable[[int, RunResult], None] | None = None,
    profile_memory: bool = False,
    save_final: bool = True,
) -> RunResult:
    """Run (or with ``resume=True`` continue) the experiment `cfg`; see the module docstring.

    ``on_update(round, spec, update)`` sees every client update before aggregation;
    ``on_round_end(round, result)`` runs after each round's checkpoint (raise `RunStopped` to
    stop there). ``profile_memory`` records the peak traced Python allocations of the round's
    streamed aggregation (clients train inside the stream, one at a time)
    (``mem_aggregate_peak_bytes``) and the process RSS (``mem_rss_mb``) in each round row.
    """
    log = log or LOG
    validate_config(cfg)
    run_dir = Path(cfg.output_dir)
    state = load_checkpoint(run_dir) if resume else None
    if resume and state is None:
        log.info("no checkpoint in %s: starting from round 1", run_dir)
    if state is not None:
        saved = from_dict(state["config"])
        # `rounds` may grow: resuming a finished run with more rounds extends it
        changed = diff(saved, cfg, ignore=("output_dir", "threads", "rounds"))
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
    threads = set_threads(cfg.threads)
    t_setup = time.perf_counter()
    where = placement(cfg)

    from fedlora.data import encode_classification, label_mapping
    from fedlora.evaluate import evaluate, task_labels

    examples = load_data(cfg)
    split = build_split(cfg, examples)
    classifier = cfg.model.kind == "classifier"
    label_to_id = label_mapping(examples) if classifier else None
    labels = task_labels(examples)
    model, tokenizer = load_base_model(cfg, len(label_to_id) if classifier else None, where)
    host = build_host(cfg, model)
    shapes = host.shapes()
    modules = host.module_names()
    specs = client_specs(cfg, modules, shapes, split.train)
    strategy = build_strategy(cfg, shapes, specs)
    train_clients = split.training_clients
    k = cfg.sampled_per_round()
    if k > len(train_clients):
        raise ConfigError(
            f"clients_per_round: {k} sampled per round but only {len(train_clients)} clients "
            "train; lower clients_per_round"
        )
    sets = eval_sets(cfg, split)
    train_cfg = train_config(cfg)
    sampler = np.random.default_rng([cfg.seed, 7])
    full_ft = full_ft_nbytes(shapes)

    rows: list[dict[str, Any]] = []
    start = 1
    totals = {"bytes_down": 0, "bytes_up": 0, "participations": 0}
    if state is not None:
        strategy.load_state_dict(state["strategy"])
        set_rng_state(state["rng"], sampler=sampler)
        rows = list(state["rows"])
        totals = dict(state["totals"])
        start = int(state["round"]) + 1
        log.info("resuming %s after round %d", run_dir, state["round"])
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", dumps_toml(cfg))
    metrics = _Jsonl(run_dir / "metrics.jsonl", rows)
    result = RunResult(run_dir, cfg, rows, {}, strategy, specs)
    log.info(
        "%s: %s on %s (%s, %s, %s weights), %d clients (%d train, %d per round), %d modules, "
        "%d threads, setup %.1fs",
        cfg.name,
        cfg.strategy.name,
        cfg.model.name,
        where.device,
        precision_name(where.compute),
        str(where.storage).replace("torch.", ""),
        len(specs),
        len(train_clients),
        k,
        len(modules),
        threads,
        time.perf_counter() - t_setup,
    )

    def client_data(c: int):
        ex = [examples[i] for i in split.train[c]]
        if classifier:
            return [
                encode_classification(tokenizer, e, label_to_id, cfg.train.max_length)
                for e in ex
                if e.label is not None
            ]
        return ex

    bar = _bar(progress, cfg.rounds, start)
    for rnd in range(start, cfg.rounds + 1):
        t0 = time.perf_counter()
        chosen = sorted(int(c) for c in sampler.choice(train_clients, k, replace=False))
        tally = {"down": 0, "up": 0, "replies": 0, "t_train": 0.0, "losses": []}
        cbar = _bar(progress, len(chosen), 1, leave=False, desc=f"round {rnd}", unit="client")
        stream = _trained_updates(
            chosen,
            rnd,
            strategy,
            specs,
            host,
            client_data,
            train_cfg,
            tokenizer,
            on_update,
            tally,
            cbar,
        )
        if profile_memory:
            tracemalloc.start()
        strategy.aggregate(rnd, stream)
        mem: dict[str, float] = {}
        if profile_memory:
            mem["mem_aggregate_peak_bytes"] = float(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        if cbar is not None:
            cbar.close()
        t2 = time.perf_counter()
        t1 = t0 + tally["t_train"]  # aggregation time below excludes the clients' training
        down, up, replies, losses = tally["down"], tally["up"], tally["replies"], tally["losses"]
        eval_rows = []
        if rnd % cfg.eval.every == 0 or rnd == cfg.rounds:
            with host.use_global(strategy.global_delta()) as gmodel:
                for name, idx in sets.items():
                    te = time.perf_counter()
                    out = evaluate(
                        gmodel,
                        tokenizer,
                        [examples[i] for i in idx],
                        cfg.eval.metrics,
                        batch_size=cfg.eval.batch_size,
                        max_new_tokens=cfg.eval.max_new_tokens,
                        max_length=cfg.train.max_length,
                        kind=cfg.model.kind,
                        labels=labels,
                        label_to_id=label_to_id,
                        per_task=cfg.eval.per_task,
                        precision=cfg.train.precision,
                    )
                    eval_rows.append(
                        {
                            "kind": "eval",
                            "round": rnd,
                            "set": name,
                            **out,
                            "time_eval": time.perf_counter() - te,
                        }
                    )
        t3 = time.perf_counter()
        totals["bytes_down"] += down
        totals["bytes_up"] += up
        totals["participations"] += replies
        n_total = sum(n for _, n in losses)
        row = {
            "kind": "round",
            "round": rnd,
            "clients": [specs[c].client_id for c in chosen],
            "replies": replies,
            "train_loss": sum(v * n for v, n in losses) / n_total,
            "bytes_down": down,
            "bytes_up": up,
            "bytes_down_total": totals["bytes_down"],
            "bytes_up_total": totals["bytes_up"],
            "full_ft_bytes_total": 2 * full_ft * totals["participations"],
            "time_train": t1 - t0,
            "time_aggregate": t2 - t1,
            "time_eval": t3 - t2,
            "time_round": t3 - t0,
            **mem,
        }
        if profile_memory:
            row["mem_rss_mb"] = _rss_mb()
        for r in (row, *eval_rows):
            rows.append(r)
            metrics.append(r)
        save_checkpoint(
            run_dir,
            {
                "round": rnd,
                "strategy": strategy.state_dict(),
                "rng": rng_state(sampler=sampler),
                "rows": rows,
                "totals": totals,
                "config": to_dict(cfg),
            },
        )
        seen = next((r for r in eval_rows if r["set"] == "seen_clients"), None)
        log.info(
            "round %d/%d: train loss %.4f%s, %d replies, up %s down %s, %.1fs",
            rnd,
            cfg.rounds,
            row["train_loss"],
            f", eval loss {seen['loss']:.4f}" if seen and "loss" in seen else "",
            replies,
            _fmt_bytes(up),
            _fmt_bytes(down),
            row["time_round"],
        )
        if bar is not None:
            bar.set_postfix(loss=f"{row['train_loss']:.3f}")
            bar.update(1)
        if on_round_end is not None:
            try:
                on_round_end(rnd, result)
            except RunStopped:
                if bar is not None:
                    bar.close()
                raise
    if bar is not None:
        bar.close()

    result.summary = _summary(cfg, rows, totals, full_ft, specs, split)
    atomic_write_text(run_dir / "summary.json", json.dumps(result.summary, indent=2) + "\n")
    if save_final:
        delta = strategy.global_delta()
        if any(f.rank > 0 for f in delta.values()):
            host.save_adapter(delta, run_dir / "adapter", alpha=None)
            if cfg.model.save_merged:
                host.merge_and_save(delta, run_dir / "merged", tokenizer)
    return result


def _trained_updates(
    chosen, rnd, strategy, specs, host, client_data, train_cfg, tokenizer, on_update, tally, cbar
):
    """Train the chosen clients one at a time, as the strategy consumes them: a streaming
    strategy (flexlora, flora) never holds more than one client's update. Counts bytes, losses
    and training time into `tally`."""
    from fedlora.client import train_client

    for c in chosen:
        tc = time.perf_counter()
        spec = specs[c]
        payload = strategy.configure(spec, rnd)
        tally["down"] += payload_nbytes(payload)
        update = train_client(
            host, spec, payload, client_data(c), train_cfg, tokenizer, server_round=rnd
        )
        tally["up"] += update_nbytes(update, payload.trainable)
        if on_update is not None:
            on_update(rnd, spec, update)
        loss = float(update.extras.get("train_loss", float("nan")))
        tally["losses"].append((loss, update.num_examples))
        tally["replies"] += 1
        tally["t_train"] += time.perf_counter() - tc
        if cbar is not None:
            cbar.set_postfix(loss=f"{loss:.3f}")
            cbar.update(1)
        yield update


def _get(cfg: Any, dotted: str) -> Any:
    node: Any = to_dict(cfg)
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _summary(cfg, rows, totals, full_ft, specs, split) -> dict[str, Any]:
    final: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["kind"] == "eval":
            final[r["set"]] = {
                k: v
                for k, v in r.items()
                if k not in ("kind", "set") and not k.startswith(MEASURED)
            }
    rounds = [r for r in rows if r["kind"] == "round"]
    lora = totals["bytes_down"] + totals["bytes_up"]
    full = 2 * full_ft * totals["participations"]
    ranks = [sum(s.ranks.values()) / len(s.ranks) for s in specs]
    return {
        "name": cfg.name,
        "strategy": cfg.strategy.name,
        "model": cfg.model.name,
        "rounds": len(rounds),
        "num_clients": len(specs),
        "training_clients": len(split.training_clients),
        "mean_rank": sum(ranks) / len(ranks),
        "bytes_down": totals["bytes_down"],
        "bytes_up": totals["bytes_up"],
        "bytes_total": lora,
        "full_ft_bytes": full,
        "comm_ratio_vs_full_ft": lora / full if full else None,
        "final": final,
        "time_train": sum(r["time_train"] for r in rounds),
        "time_aggregate": sum(r["time_aggregate"] for r in rounds),
        "time_eval": sum(r["time_eval"] for r in rounds),
        "time_total": sum(r["time_round"] for r in rounds),
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}B"  # pragma: no cover


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
