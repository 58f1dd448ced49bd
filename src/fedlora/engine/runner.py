"""The in-process engine: one base model, many simulated clients, any strategy.

`run_experiment(cfg)` sets up once (`setup`: data, split, model, clients' ranks, strategy,
all seeded), then runs each round as a loop of named steps:

1. `sample_clients`: draw the round's clients (seeded, without replacement);
2. `train_clients` -> `train_one`: configure each client's payload and train it on the single
   `LoraHost` (peft wrappers cached per rank configuration), when the aggregation asks for it;
3. ... and check its update against the payload (`fedlora.contract.check_update`);
4. `screen`: bound each client's contribution norm (`fedlora.robust`);
5. `aggregate`: fold the kept updates into the strategy (nothing kept: model unchanged);
6. `evaluate_global` on schedule; 7. `checkpoint`; 8. `round_row` / `report_round`.

A client that raises, reports a non-finite loss or sends an update failing a check or a bound
is dropped for the round, with its reason in the round row (``dropped``) and in
``summary.json``; ``robust.fatal_drops`` makes the first drop stop the run. Per round the
server holds only the round's updates (streamed when no relative bound needs the whole
round): nothing grows with the number of clients except their small specs.

Run directory (``cfg.output_dir``): ``config.toml`` (resolved), ``metrics.jsonl`` (one row per
round with ``kind="round"`` and one per evaluated client set with ``kind="eval"``),
``eval_examples.jsonl`` (per evaluated round and set, the per-example values behind the
metrics: `fedlora.evaluate.example_columns` plus ``example``, the examples' indices),
``summary.json``, ``checkpoint.safetensors``, ``adapter/`` (the final global delta as a peft
adapter) and, with ``model.save_merged``, ``merged/``. A directory that holds a run is never
overwritten silently (`check_run_dir`).

Keys of rows starting with ``time_`` or ``mem_`` are measurements; everything else is
deterministic for a configuration, and a resumed run reproduces it exactly.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.checkpoint import (
    CHECKPOINT,
    LEGACY_CHECKPOINT,
    atomic_write_text,
    load_checkpoint,
    remove_stale_temp,
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
    FedLoraError,
    Strategy,
    check_update,
    payload_nbytes,
    update_nbytes,
)
from fedlora.device import precision_name
from fedlora.engine.tiny import TINY_MODELS, build_tiny
from fedlora.privacy import PrivacyLedger, attach_central
from fedlora.privacy import plan as privacy_plan
from fedlora.robust import NormBound, Start, screen_updates, start_of

LOG = logging.getLogger("fedlora.engine")
EVAL_SETS = ("seen_clients", "unseen_clients", "unseen_tasks")
MEASURED = ("time_", "mem_")
EXAMPLES_FILE = "eval_examples.jsonl"


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
    storage = resolve_dtype(cfg.model.dtype, compute)
    if compute == torch.float32 and storage != torch.float32:
        # without autocast a 16-bit model computes in 16 bits end to end, and peft adds the
        # LoRA term in 16 bits, where a young adapter's effect rounds away
        # (benchmarks/precision_loss.py); autocast keeps those sums in float32
        raise ConfigError(
            f"model.dtype = {cfg.model.dtype!r} needs mixed precision, but train.precision = "
            f"{cfg.train.precision!r} computes in fp32 on {device}: set train.precision = "
            "'bf16' (or 'fp16' on CUDA), or model.dtype = 'float32'"
        )
    return Placement(device, compute, storage)


def load_base_model(cfg: ExperimentConfig, num_labels: int | None = None, where=None):
    """``(model, tokenizer)`` for ``cfg.model`` (tiny random models included), on the device
    and in the dtype of `placement` (`where`, resolved here when None)."""
    where = where or placement(cfg)
    m = cfg.model
    if m.name in TINY_MODELS:
        model, tok = build_tiny(m.name, m.kind, num_labels)
        return model.to(where.device, where.storage), tok
    from fedlora.models import load_model

    if m.name.startswith((".", "/", "~")) and not Path(m.name).expanduser().exists():
        raise ConfigError(f"model.name = {m.name!r}: no such directory")
    try:
        return load_model(
            str(Path(m.name).expanduser()),
            m.kind,
            num_labels,
            where.storage,
            device=where.device,
            quantization=m.quantization,
            compute_dtype=where.compute,
        )
    except (OSError, ValueError) as e:  # not a model folder, not a hub id, bad config
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.name = {m.name!r}: cannot load it ({first})") from None


def build_host(cfg: ExperimentConfig, model):
    """The `LoraHost` of ``cfg.model`` on `model` (the engine's and the Flower ClientApp's)."""
    from fedlora.models import LoraHost, default_target_modules

    return LoraHost(
        model,
        cfg.model.target_modules or default_target_modules(model),
        lora_dropout=cfg.model.dropout,
        rslora=cfg.model.rslora,
        alpha=cfg.model.alpha,
        modules_to_save=modules_to_save(cfg, model),
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
    try:
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
    except ValueError as e:  # the partitioner's message names the option (num_clients, ...)
        raise ConfigError(f"data ({d.source}, partition {d.partition!r}): {e}") from None
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
        if r.homogeneous_rank is not None:  # capped like the types' ranks below
            ranks = {m: min(r.homogeneous_rank, *shapes[m]) for m in modules}
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


def modules_to_save(cfg: ExperimentConfig, model) -> list[str]:
    """``model.modules_to_save``, or by default the head of a classifier (nothing for causal)."""
    from fedlora.models import default_modules_to_save

    if cfg.model.modules_to_save is not None:
        return list(cfg.model.modules_to_save)
    return default_modules_to_save(model, cfg.model.kind)


def build_strategy(
    cfg: ExperimentConfig, shapes, specs: Sequence[ClientSpec], privacy: PrivacyLedger | None = None
) -> Strategy:
    """The configured strategy; with a central-mode `privacy` ledger, central DP is on."""
    import fedlora.strategies as registry

    options = dict(cfg.strategy.options)
    if cfg.strategy.name == "lora_a2":
        options.setdefault("global_rank", max(max(s.ranks.values()) for s in specs))
    strategy = registry.get(cfg.strategy.name, seed=cfg.seed, shapes=shapes, **options)
    if privacy is not None and privacy.mode == "central":
        attach_central(strategy, privacy.central_dp(cfg.sampled_per_round(), cfg.seed))
    return strategy


def build_privacy(
    cfg: ExperimentConfig, specs: Sequence[ClientSpec], train_clients: Sequence[int]
) -> PrivacyLedger | None:
    """The run's resolved privacy (`fedlora.privacy.plan`), None when ``privacy.mode`` is
    "none"; a deterministic function of the configuration, so every engine and node agrees."""
    v = cfg.privacy
    if v.mode == "none":
        return None
    return privacy_plan(
        mode=v.mode,
        clip_norm=v.clip_norm,
        noise_multiplier=v.noise_multiplier,
        target_epsilon=v.target_epsilon,
        delta=v.delta,
        accountant=v.accountant,
        rounds=cfg.rounds,
        clients_per_round=cfg.sampled_per_round(),
        num_clients=len(train_clients),
        client_sizes=[specs[c].num_examples or 1 for c in train_clients],
        batch_size=cfg.train.batch_size,
        steps=cfg.train.local_steps,
        epochs=cfg.train.epochs,
    )


def norm_bound(cfg: ExperimentConfig) -> NormBound:
    """The robustness screen's norm bounds; none under central DP, whose clipping to
    ``privacy.clip_norm`` bounds every client instead (a bound relative to the round's median
    would let one client's data decide whether another is dropped, outside the sensitivity)."""
    if cfg.privacy.mode == "central":
        return NormBound(None, None, cfg.robust.action)
    return cfg.robust.bound()


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


# -- the run directory ----------------------------------------------------------------------

#: files whose presence means a directory holds a run (refused without resume or overwrite)
RUN_FILES = ("metrics.jsonl", "summary.json", CHECKPOINT, LEGACY_CHECKPOINT)
#: what a run writes there, removed by ``overwrite`` (nothing else in the directory is touched)
RUN_OUTPUTS = (
    "config.toml",
    "partition.json",
    "spectrum.json",
    "adapter",
    "merged",
    "plots",
    *RUN_FILES,
)


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over one that is there, unless told to resume or overwrite."""
    if resume and overwrite:
        raise ConfigError("resume and overwrite: choose one (continue the run, or replace it)")
    held = [n for n in RUN_FILES if (run_dir / n).exists()]
    if held and not resume and not overwrite:
        raise FedLoraError(
            f"{run_dir} already holds a run ({', '.join(held)}); continue it with "
            f"`fedlora run --resume {run_dir}`, replace it with --overwrite, or choose another "
            "--output-dir"
        )


def clear_run_dir(run_dir: Path, log: logging.Logger) -> None:
    """Remove what an earlier run wrote in `run_dir` (``overwrite``), and nothing else."""
    removed = []
    for name in RUN_OUTPUTS:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        log.info("overwrite: removed %s from %s", ", ".join(removed), run_dir)


def check_resumable(state: dict[str, Any], cfg: ExperimentConfig, run_dir: Path) -> None:
    """The checkpoint in `run_dir` was written by this configuration (`rounds` may grow)."""
    saved = from_dict(state["config"])
    # parallel_clients: how clients share the hardware, not what they compute
    changed = diff(saved, cfg, ignore=("output_dir", "threads", "rounds", "train.parallel_clients"))
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


class _Jsonl:
    def __init__(self, path: Path, rows: list[dict[str, Any]]) -> None:
        self.path = path
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _rows_before(path: Path, start: int) -> list[dict[str, Any]]:
    """The rows of a JSONL file from rounds before `start` (a resumed run rewrites the rest)."""
    if start <= 1 or not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["round"] < start]


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- setup ----------------------------------------------------------------------------------


@dataclass
class Federation:
    """What a run builds once (`setup`): the data and its split, the host model, every
    client's spec, the strategy, the evaluation sets and the per-round options."""

    cfg: ExperimentConfig
    examples: list[Any]
    split: Any
    host: Any
    tokenizer: Any
    specs: list[ClientSpec]
    strategy: Strategy
    train_cfg: Any
    where: Placement
    sets: dict[str, list[int]]
    bound: NormBound
    label_to_id: dict[str, int] | None
    labels: Any
    full_ft: int
    ledger: PrivacyLedger | None = None  # the run's privacy accounting (None without DP)
    # client -> its tokenized training examples, kept across rounds (`client_data`)
    data_cache: dict[int, list[Any]] = field(default_factory=dict, repr=False)

    @property
    def local_dp(self):
        """The clients' DP-SGD options in local privacy mode, else None."""
        return self.ledger.local_dp() if self.ledger and self.ledger.mode == "local" else None

    @property
    def train_clients(self) -> list[int]:
        return self.split.training_clients

    def client_data(self, c: int) -> list[Any]:
        """Client `c`'s training examples, tokenized once and kept for later rounds
        (`fedlora.engine.groups.tokenized`; ``data_cache``)."""
        from fedlora.engine.groups import tokenized

        if c not in self.data_cache:
            self.data_cache[c] = tokenized(self, c)
        return self.data_cache[c]


def setup(cfg: ExperimentConfig) -> Federation:
    """Load the data, split it, load the model and build clients and strategy (seeded)."""
    from fedlora.data import label_mapping
    from fedlora.evaluate import task_labels

    where = placement(cfg)

    examples = load_data(cfg)
    split = build_split(cfg, examples)
    classifier = cfg.model.kind == "classifier"
    label_to_id = label_mapping(examples) if classifier else None
    model, tokenizer = load_base_model(cfg, len(label_to_id) if label_to_id else None, where)
    host = build_host(cfg, model)
    shapes = host.shapes()
    specs = client_specs(cfg, host.module_names(), shapes, split.train)
    ledger = build_privacy(cfg, specs, split.training_clients)
    k = cfg.sampled_per_round()
    if k > len(split.training_clients):
        raise ConfigError(
            f"clients_per_round: {k} sampled per round but only {len(split.training_clients)} "
            "clients train; lower clients_per_round"
        )
    return Federation(
        cfg=cfg,
        examples=examples,
        split=split,
        host=host,
        tokenizer=tokenizer,
        specs=specs,
        strategy=build_strategy(cfg, shapes, specs, ledger),
        train_cfg=train_config(cfg),
        where=where,
        sets=eval_sets(cfg, split),
        bound=norm_bound(cfg),
        label_to_id=label_to_id,
        labels=task_labels(examples),
        full_ft=full_ft_nbytes(shapes),
        ledger=ledger,
    )


# -- one round, as named steps ----------------------------------------------------------------


@dataclass
class RoundTally:
    """What a round's steps count: bytes, replies, training time, and per client its loss
    and contribution norm (kept updates), why it was dropped, or the fraction kept by a clip."""

    down: int = 0
    up: int = 0
    replies: int = 0
    t_train: float = 0.0
    losses: list[tuple[float, int]] = field(default_factory=list)
    norms: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)
    trained: list[ClientUpdate] = field(default_factory=list)  # extras of every trained client


def sample_clients(fed: Federation, sampler: np.random.Generator) -> list[int]:
    """Step 1: the round's clients, drawn without replacement (seeded, checkpointed)."""
    k = fed.cfg.sampled_per_round()
    return sorted(int(c) for c in sampler.choice(fed.train_clients, k, replace=False))


def _drop(fed: Federation, tally: RoundTally, rnd: int, client: str, reason: str) -> None:
    tally.dropped[client] = reason
    LOG.warning("round %d: client %s dropped: %s", rnd, client, reason)
    if fed.cfg.robust.fatal_drops:
        raise FedLoraError(f"round {rnd}: client {client} dropped: {reason} (robust.fatal_drops)")


def train_one(fed: Federation, rnd: int, c: int, tally: RoundTally, on_update):
    """Steps 2-3 for client `c`: configure its payload, train it, check its update against
    the payload (`fedlora.contract.check_update`). Returns (update, start factors)."""
    from fedlora.client import train_client

    spec = fed.specs[c]
    payload = fed.strategy.configure(spec, rnd)
    tally.down += payload_nbytes(payload)
    update = train_client(
        fed.host,
        spec,
        payload,
        fed.client_data(c),
        fed.train_cfg,
        fed.tokenizer,
        server_round=rnd,
        privacy=fed.local_dp,
    )
    return finish_one(fed, rnd, spec, payload, update, tally, on_update)


def finish_one(fed: Federation, rnd: int, spec, payload, update, tally: RoundTally, on_update):
    """Step 3 for one trained client: count it, let ``on_update`` replace it, check it."""
    # what it spent (local DP-SGD's steps), whether or not its update is used
    tally.trained.append(ClientUpdate(update.client_id, {}, 1, dict(update.extras)))
    tally.up += update_nbytes(update, payload.trainable)
    tally.replies += 1
    if on_update is not None:
        replaced = on_update(rnd, spec, update)
        if isinstance(replaced, ClientUpdate):
            update = replaced
    check_update(fed.strategy, rnd, spec, payload, update)
    return update, start_of(update, payload)


def train_clients(
    fed: Federation, rnd: int, chosen: Sequence[int], tally: RoundTally, on_update, cbar
) -> Iterator[tuple[ClientUpdate, Start]]:
    """Steps 2-3 for the round: each chosen client is trained when the aggregation asks for
    its update (a streaming strategy holds one at a time). A client that raises (a non-finite
    loss included) or whose update fails a check is dropped for the round, with the reason.
    With ``train.parallel_clients`` > 1 the clients train in groups (`fedlora.engine.groups`),
    their updates streamed in the same order."""
    from fedlora.engine.groups import parallel_width, train_grouped

    width = parallel_width(fed)
    if width > 1:
        yield from train_grouped(fed, rnd, chosen, tally, on_update, cbar, width)
        return
    for c in chosen:
        spec = fed.specs[c]
        tc = time.perf_counter()
        item = guarded(fed, rnd, spec, tally, lambda c=c: train_one(fed, rnd, c, tally, on_update))
        tally.t_train += time.perf_counter() - tc
        if cbar is not None:
            cbar.update(1)
        if item is not None:
            yield item


def guarded(fed: Federation, rnd: int, spec, tally: RoundTally, work: Callable[[], Any]):
    """``work()``, or None with the client dropped when it raises (``robust.fatal_drops``:
    an unexpected error stops the run)."""
    try:
        return work()
    except Exception as e:  # noqa: BLE001 - a failing client is dropped, not the run
        if fed.cfg.robust.fatal_drops and not isinstance(e, FedLoraError):
            raise
        LOG.debug("round %d: client %s failed", rnd, spec.client_id, exc_info=True)
        reason = str(e) if isinstance(e, FedLoraError) else f"{type(e).__name__}: {e}"
        _drop(fed, tally, rnd, spec.client_id, reason)
        return None


def screen(
    fed: Federation, rnd: int, items: Iterator[tuple[ClientUpdate, Start]], tally: RoundTally
) -> Iterator[ClientUpdate]:
    """Step 4: the norm bounds (`fedlora.robust.screen_updates`). A relative bound needs the
    round's norms, so the round is gathered first; an absolute one screens the stream."""
    batches = [list(items)] if fed.bound.needs_round else ([item] for item in items)
    for batch in batches:
        result = screen_updates(batch, fed.bound)
        tally.norms.update(result.norms)
        tally.clipped.update(result.clipped)
        for client, reason in result.dropped.items():
            _drop(fed, tally, rnd, client, reason)
        for u in result.kept:
            tally.losses.append((float(u.extras.get("train_loss", math.nan)), u.num_examples))
            yield u


def aggregate(fed: Federation, rnd: int, updates: Iterator[ClientUpdate]) -> bool:
    """Step 5: fold the kept updates into the strategy; with none, leave the global model
    unchanged. Returns whether anything was aggregated."""
    first = next(updates, None)
    if first is None:
        LOG.warning("round %d: no usable update; the global model is unchanged", rnd)
        return False
    fed.strategy.aggregate(rnd, itertools.chain([first], updates))
    return True


def evaluate_global(
    fed: Federation, rnd: int, per_example: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Step 6: the global model on every evaluation set, on schedule (and after the last
    round). Each set's per-example values go to `per_example` (a row per set)."""
    from fedlora.evaluate import evaluate_detailed

    cfg = fed.cfg
    if rnd % cfg.eval.every != 0 and rnd != cfg.rounds:
        return []
    rows = []
    with fed.host.use_global(fed.strategy.global_delta(), fed.strategy.dense) as gmodel:
        for name, idx in fed.sets.items():
            te = time.perf_counter()
            ev = evaluate_detailed(
                gmodel,
                fed.tokenizer,
                [fed.examples[i] for i in idx],
                cfg.eval.metrics,
                batch_size=cfg.eval.batch_size,
                max_new_tokens=cfg.eval.max_new_tokens,
                max_length=cfg.train.max_length,
                kind=cfg.model.kind,
                labels=fed.labels,
                label_to_id=fed.label_to_id,
                per_task=cfg.eval.per_task,
                precision=cfg.train.precision,
                max_generations=cfg.eval.max_generations,
                n_boot=cfg.eval.bootstrap,
            )
            te = time.perf_counter() - te
            rows.append({"kind": "eval", "round": rnd, "set": name, **ev.metrics, "time_eval": te})
            if per_example is not None:
                per_example.append({"round": rnd, "set": name, "example": idx, **ev.examples})
    return rows


def round_row(
    fed: Federation,
    rnd: int,
    chosen: Sequence[int],
    tally: RoundTally,
    aggregated: bool,
    totals: dict[str, int],
    times: dict[str, float],
) -> dict[str, Any]:
    """The round's metrics row (`kind="round"`)."""
    totals["bytes_down"] += tally.down
    totals["bytes_up"] += tally.up
    totals["participations"] += tally.replies
    n_total = sum(n for _, n in tally.losses)
    privacy = {}
    if fed.ledger is not None:  # central: a round counts when noise was released
        counts = fed.ledger.mode == "local" or aggregated
        eps = fed.ledger.record_round(tally.trained) if counts else fed.ledger.epsilon()
        privacy["epsilon"] = eps
    return {
        "kind": "round",
        "round": rnd,
        "clients": [fed.specs[c].client_id for c in chosen],
        "replies": tally.replies,
        "used": len(tally.losses),
        "aggregated": aggregated,
        "dropped": dict(tally.dropped),
        "clipped": dict(tally.clipped),
        "update_norms": dict(tally.norms),
        "train_loss": sum(v * n for v, n in tally.losses) / n_total if n_total else None,
        "bytes_down": tally.down,
        "bytes_up": tally.up,
        "bytes_down_total": totals["bytes_down"],
        "bytes_up_total": totals["bytes_up"],
        "full_ft_bytes_total": 2 * fed.full_ft * totals["participations"],
        **privacy,
        **times,
    }


def checkpoint(fed: Federation, run_dir: Path, rnd: int, sampler, rows, totals) -> None:
    """Step 7: everything needed to resume after round `rnd` (`fedlora.checkpoint`)."""
    save_checkpoint(
        run_dir,
        {
            "round": rnd,
            "strategy": fed.strategy.state_dict(),
            "rng": rng_state(sampler=sampler),
            "rows": rows,
            "totals": totals,
            "config": to_dict(fed.cfg),
            "privacy": fed.ledger.state_dict() if fed.ledger is not None else {},
        },
    )


def report_round(log, cfg, row: dict[str, Any], eval_rows, bar) -> None:
    """Step 8: one log line (and the progress bar) for the round."""
    seen = next((r for r in eval_rows if r["set"] == "seen_clients"), None)
    loss = row["train_loss"]
    log.info(
        "round %d/%d: train loss %s%s, %d of %d clients used%s, up %s down %s, %.1fs",
        row["round"],
        cfg.rounds,
        "-" if loss is None else f"{loss:.4f}",
        f", eval loss {seen['loss']:.4f}" if seen and "loss" in seen else "",
        row["used"],
        len(row["clients"]),
        "" if row["aggregated"] else " (no usable update: global model unchanged)",
        _fmt_bytes(row["bytes_up"]),
        _fmt_bytes(row["bytes_down"]),
        row["time_round"],
    )
    if bar is not None:
        bar.set_postfix(loss="-" if loss is None else f"{loss:.3f}")
        bar.update(1)


# -- the run --------------------------------------------------------------------------------


def run_experiment(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: logging.Logger | None = None,
    on_update: Callable[[int, ClientSpec, ClientUpdate], ClientUpdate | None] | None = None,
    on_round_end: Callable[[int, RunResult], None] | None = None,
    profile_memory: bool = False,
    save_final: bool = True,
) -> RunResult:
    """Run (or with ``resume=True`` continue) the experiment `cfg`; see the module docstring.

    A directory that already holds a run is refused unless ``resume`` or ``overwrite`` (which
    removes that run's files first). ``on_update(round, spec, update)`` sees every client
    update before it is checked and aggregated, and may return a replacement (fault
    injection); ``on_round_end(round, result)`` runs after each round's checkpoint (raise
    `RunStopped` to stop there). ``profile_memory`` records the peak traced Python
    allocations of the round's streamed aggregation (clients train inside the stream, one at
    a time) (``mem_aggregate_peak_bytes``) and the process RSS (``mem_rss_mb``) in each round
    row.
    """
    log = log or LOG
    validate_config(cfg)
    run_dir = Path(cfg.output_dir)
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    removed = remove_stale_temp(run_dir)
    if removed:
        log.info("removed %d temporary file(s) a killed run left in %s", len(removed), run_dir)
    state = load_checkpoint(run_dir) if resume else None
    if resume and state is None:
        log.info("no checkpoint in %s: starting from round 1", run_dir)
    if state is not None:
        check_resumable(state, cfg, run_dir)
    threads = set_threads(cfg.threads)
    t_setup = time.perf_counter()
    fed = setup(cfg)
    sampler = np.random.default_rng([cfg.seed, 7])
    rows: list[dict[str, Any]] = []
    start = 1
    totals = {"bytes_down": 0, "bytes_up": 0, "participations": 0}
    if state is not None:
        fed.strategy.load_state_dict(state["strategy"])
        set_rng_state(state["rng"], sampler=sampler)
        rows = list(state["rows"])
        totals = dict(state["totals"])
        if fed.ledger is not None:
            fed.ledger.load_state_dict(state.get("privacy", {}))
        start = int(state["round"]) + 1
        log.info("resuming %s after round %d", run_dir, state["round"])
    elif overwrite:
        clear_run_dir(run_dir, log)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", dumps_toml(cfg))
    metrics = _Jsonl(run_dir / "metrics.jsonl", rows)
    per_example = _Jsonl(run_dir / EXAMPLES_FILE, _rows_before(run_dir / EXAMPLES_FILE, start))
    result = RunResult(run_dir, cfg, rows, {}, fed.strategy, fed.specs)
    log.info(
        "%s: %s on %s (%s, %s, %s weights), %d clients (%d train, %d per round), %d modules, "
        "%d threads, setup %.1fs",
        cfg.name,
        cfg.strategy.name,
        cfg.model.name,
        fed.where.device,
        precision_name(fed.where.compute),
        str(fed.where.storage).replace("torch.", ""),
        len(fed.specs),
        len(fed.train_clients),
        cfg.sampled_per_round(),
        len(fed.host.module_names()),
        threads,
        time.perf_counter() - t_setup,
    )

    bar = _bar(progress, cfg.rounds, start)
    try:
        for rnd in range(start, cfg.rounds + 1):
            t0 = time.perf_counter()
            chosen = sample_clients(fed, sampler)
            tally = RoundTally()
            cbar = _bar(progress, len(chosen), 1, leave=False, desc=f"round {rnd}", unit="client")
            if profile_memory:
                tracemalloc.start()
            fed.strategy.begin_round(rnd)
            stream = train_clients(fed, rnd, chosen, tally, on_update, cbar)
            aggregated = aggregate(fed, rnd, screen(fed, rnd, stream, tally))
            mem: dict[str, float] = {}
            if profile_memory:
                mem["mem_aggregate_peak_bytes"] = float(tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
                mem["mem_rss_mb"] = _rss_mb()
            if cbar is not None:
                cbar.close()
            t2 = time.perf_counter()
            examples_rows: list[dict[str, Any]] = []
            eval_rows = evaluate_global(fed, rnd, examples_rows)
            for r in examples_rows:
                per_example.append(r)
            t3 = time.perf_counter()
            times = {
                # aggregation time excludes the clients' training, done inside the stream
                "time_train": tally.t_train,
                "time_aggregate": t2 - t0 - tally.t_train,
                "time_eval": t3 - t2,
                "time_round": t3 - t0,
                **mem,
            }
            row = round_row(fed, rnd, chosen, tally, aggregated, totals, times)
            for r in (row, *eval_rows):
                rows.append(r)
                metrics.append(r)
            checkpoint(fed, run_dir, rnd, sampler, rows, totals)
            report_round(log, cfg, row, eval_rows, bar)
            if on_round_end is not None:
                on_round_end(rnd, result)
    finally:
        if bar is not None:
            bar.close()
    result.summary = _summary(cfg, rows, totals, fed.full_ft, fed.specs, fed.split)
    if fed.ledger is not None:
        result.summary["privacy"] = fed.ledger.summary()
    atomic_write_text(run_dir / "summary.json", json.dumps(result.summary, indent=2) + "\n")
    if save_final:
        delta = fed.strategy.global_delta()
        if any(f.rank > 0 for f in delta.values()):
            dense = fed.strategy.dense
            fed.host.save_adapter(delta, run_dir / "adapter", alpha=None, dense=dense)
            if cfg.model.save_merged:
                fed.host.merge_and_save(delta, run_dir / "merged", fed.tokenizer, dense)
    return result


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
        # per round with any: client -> why it was dropped / the fraction of it kept by a clip
        "dropped": {str(r["round"]): r["dropped"] for r in rounds if r.get("dropped")},
        "clipped": {str(r["round"]): r["clipped"] for r in rounds if r.get("clipped")},
        "rounds_without_update": [r["round"] for r in rounds if not r.get("aggregated", True)],
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
