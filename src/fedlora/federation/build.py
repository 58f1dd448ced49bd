"""Building a federation from an `ExperimentConfig`: the same in every engine.

`build_clients(cfg)` is the client side (what a node or the in-process engine loads: data and
its split, the model and its `LoraHost`, every client's `ClientSpec`, the training options);
`build_server(cfg, clients)` the server side (the strategy, the privacy ledger, the norm
bounds); `build_federation(cfg)` both, with the evaluation sets. All of it is seeded by
``cfg.seed``: a Flower node and the in-process engine build the same clients.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.clients.tiny import TINY_MODELS, build_tiny
from fedlora.core.accounting import Plan, PrivacyLedger, draw_secret, seeded_secret
from fedlora.core.accounting import plan as privacy_plan
from fedlora.core.contract import ClientSpec, ClientUpdate, Payload, Strategy
from fedlora.core.privacy import AdaptiveClip, CentralDP, attach_central, release_shape
from fedlora.core.robust import NormBound, WeightBound
from fedlora.federation.config import ConfigError, ExperimentConfig, to_dict
from fedlora.federation.rounds import Server

LOG = logging.getLogger("fedlora.federation")
_SAID: set[str] = set()  # warnings said once per process


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
    from fedlora.clients.device import (
        native_bf16,
        resolve_device,
        resolve_dtype,
        resolve_precision,
    )

    device = resolve_device(cfg.train.device)
    compute = resolve_precision(cfg.train.precision, device)
    if compute == torch.bfloat16 and device.type == "cpu" and not native_bf16(device):
        slow = (
            "train.precision = 'bf16' on a CPU without bfloat16 units (no AVX512-BF16 or AMX): "
            "emulated, it trains many times slower than fp32 (27x measured); 'auto' or 'fp32' "
            "avoid it"
        )
        if slow not in _SAID:
            _SAID.add(slow)
            LOG.warning(slow)
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
    model, tok = _load_base_model(cfg, num_labels, where)
    if cfg.model.pooling != "first":
        from fedlora.clients.models import set_pooling

        set_pooling(model, cfg.model.pooling)
    if where.storage != torch.float32 and cfg.model.quantization == "none":
        from fedlora.clients.device import float32_layer_norms

        float32_layer_norms(model)
    return model, tok


def _load_base_model(cfg: ExperimentConfig, num_labels: int | None, where: Placement):
    m = cfg.model
    if m.name in TINY_MODELS:
        model, tok = build_tiny(m.name, m.kind, num_labels)
        return model.to(where.device, where.storage), tok
    from fedlora.clients.models import load_model

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
    from fedlora.clients.models import LoraHost, default_target_modules

    return LoraHost(
        model,
        cfg.model.target_modules or default_target_modules(model),
        lora_dropout=cfg.model.dropout,
        rslora=cfg.model.rslora,
        alpha=cfg.model.alpha,
        modules_to_save=modules_to_save(cfg, model),
    )


def train_config(cfg: ExperimentConfig):
    """The clients' `fedlora.clients.train.TrainConfig`: ``cfg.train`` with the
    experiment's seed."""
    from fedlora.clients.train import TrainConfig

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
    scheme: Any = "by_task" if d.partition == "natural" else d.partition
    if d.partitioner is not None:  # a flwr-datasets partitioner instead
        from fedlora.data.flwr_partition import FlwrPartitioner

        scheme = FlwrPartitioner(d.partitioner, d.partitioner_options)
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
    from fedlora.federation.resources import RANK_TYPES, RankType, assign_resources, resource_ranks

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
    capped: dict[str, tuple[int, int]] = {}  # module -> (largest rank asked, its size)

    def cap(asked: dict[str, int]) -> dict[str, int]:
        """Ranks above a module's min(d_out, d_in) mean nothing more: capped, and said."""
        for m, k in asked.items():
            if k > min(shapes[m]):
                capped[m] = (max(k, capped.get(m, (0, 0))[0]), min(shapes[m]))
        return {m: min(k, *shapes[m]) for m, k in asked.items()}

    for i, t in enumerate(types):
        if r.homogeneous_rank is not None:  # capped like the types' ranks below
            ranks = cap({m: r.homogeneous_rank for m in modules})
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
                cache[key] = cap(raw)
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
    if capped:
        m, (k, size) = next(iter(capped.items()))
        more = f" (and {len(capped) - 1} more modules)" if len(capped) > 1 else ""
        LOG.warning(
            "resources: rank %d is above module %s's min(d_out, d_in) = %d%s: capped to the "
            "module's size; lower resources.ranks or set resources.rank_cap_fraction",
            k, m, size, more,
        )  # fmt: skip
    return specs


def modules_to_save(cfg: ExperimentConfig, model) -> list[str]:
    """``model.modules_to_save``, or by default the head of a classifier (nothing for causal)."""
    from fedlora.clients.models import default_modules_to_save

    if cfg.model.modules_to_save is not None:
        return list(cfg.model.modules_to_save)
    return default_modules_to_save(model, cfg.model.kind)


def build_strategy(
    cfg: ExperimentConfig, shapes, specs: Sequence[ClientSpec], privacy: PrivacyLedger | None = None
) -> Strategy:
    """The configured strategy; with a central-mode `privacy` ledger, central DP is on
    (`central_dp`)."""
    import fedlora.strategies as registry

    options = dict(cfg.strategy.options)
    if cfg.strategy.name == "lora_a2":
        options.setdefault("global_rank", max(max(s.ranks.values()) for s in specs))
    strategy = registry.get(cfg.strategy.name, seed=cfg.seed, shapes=shapes, **options)
    if privacy is not None and privacy.mode == "central":
        attach_central(strategy, central_dp(cfg, strategy, specs, privacy))
    return strategy


def central_dp(
    cfg: ExperimentConfig, strategy: Strategy, specs: Sequence[ClientSpec], ledger: PrivacyLedger
) -> CentralDP:
    """The server's mechanism: the ledger's secret and noise multiplier, the fixed
    denominator K, the released rank per module (the largest any client is configured with,
    whoever is sampled) and the largest LoRA scale per module; adaptive clipping when
    ``privacy.clip_norm = "adaptive"``."""
    v, k = cfg.privacy, cfg.sampled_per_round()
    ranks, scales = release_shape(strategy, specs)
    adaptive = None
    if v.clip_norm == "adaptive":
        count_noise = v.adaptive_count_noise or max(k / 20.0, ledger.noise_multiplier)
        adaptive = AdaptiveClip(v.adaptive_quantile, v.adaptive_lr, count_noise)
    return CentralDP(
        ledger.clip if ledger.clip is not None else ledger.clip_norm,
        ledger.noise_multiplier,
        k,
        secret=ledger.secret,
        ranks=ranks,
        scales=scales,
        adaptive=adaptive,
    )


def build_privacy(
    cfg: ExperimentConfig, specs: Sequence[ClientSpec], train_clients: Sequence[int]
) -> PrivacyLedger | None:
    """The run's resolved privacy (`fedlora.core.accounting.plan`), None when
    ``privacy.mode`` is "none": sigma and delta are a deterministic function of the
    configuration (every engine and node agrees); the server's secret is drawn here."""
    v = cfg.privacy
    if v.mode == "none":
        return None
    adaptive = v.clip_norm == "adaptive"
    ledger = privacy_plan(
        Plan(
            mode=v.mode,
            clip_norm=v.adaptive_initial_clip if adaptive else float(v.clip_norm),
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
            sampling=v.sampling,
            seed=cfg.seed,
            insecure_seeded_noise=v.insecure_seeded_noise,
        )
    )
    if adaptive:
        ledger.clip = ledger.clip_norm
    return ledger


def norm_bound(cfg: ExperimentConfig, base_norm: float | None = None) -> NormBound:
    """The robustness screen's norm bounds (`base_norm`: the adapted base weights' Frobenius
    norm, which sets the first-round lone bound); none under central DP, whose clipping to
    ``privacy.clip_norm`` bounds every client instead (a bound relative to the round's median
    would let one client's data decide whether another is dropped, outside the sensitivity)."""
    if cfg.privacy.mode == "central":
        return NormBound(None, None, cfg.robust.action)
    return cfg.robust.bound(base_norm)


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


# -- what a federation is --------------------------------------------------------------------


@dataclass
class Clients:
    """The client side of a federation, built once per process (`build_clients`): the data
    and its split, the host model, every client's spec and the training options."""

    cfg: ExperimentConfig
    examples: list[Any]
    split: Any
    host: Any
    tokenizer: Any
    specs: list[ClientSpec]
    train_cfg: Any
    where: Placement
    label_to_id: dict[str, int] | None
    labels: Any
    # the simulated clients' own secret (local DP-SGD noise and batches; never the server's)
    secret: int = 0
    # client -> its tokenized training examples, kept across rounds (`client_data`)
    data_cache: dict[int, list[Any]] = field(default_factory=dict, repr=False)

    @property
    def train_clients(self) -> list[int]:
        return self.split.training_clients

    def client_data(self, c: int) -> list[Any]:
        """Client `c`'s training examples as model inputs, tokenized once and kept for later
        rounds (``data_cache``: about 50 bytes per token, 0.84 MB for ``lora_a2_paper``)."""
        if c not in self.data_cache:
            self.data_cache[c] = self._tokenized(c)
        return self.data_cache[c]

    def _tokenized(self, c: int) -> list[dict[str, Any]]:
        from fedlora.clients.train import _features
        from fedlora.data import encode_classification

        ex = [self.examples[i] for i in self.split.train[c]]
        max_length = self.cfg.train.max_length
        if self.label_to_id is None:
            return _features(ex, self.tokenizer, max_length, f"client {self.specs[c].client_id}")
        return [
            encode_classification(self.tokenizer, e, self.label_to_id, max_length)
            for e in ex
            if e.label is not None
        ]

    def partition_summary(self):
        """The split's per-client sizes and label (classifier) or task histograms."""
        from fedlora.data import PartitionSummary

        key = "label" if self.cfg.model.kind == "classifier" else "task"
        return PartitionSummary.from_partition(self.examples, self.split.train, key=key)

    def train(
        self,
        c: int,
        payload: Payload,
        server_round: int,
        privacy: Any = None,
        spec: ClientSpec | None = None,
    ) -> ClientUpdate:
        """Client `c` trains from `payload` (`fedlora.clients.train.train_client`) as `spec`
        (default its configured one; a Flower node trains as the server sent it);
        ``privacy``: its DP-SGD options in local mode."""
        from fedlora.clients.train import train_client

        return train_client(
            self.host,
            spec or self.specs[c],
            payload,
            self.client_data(c),
            self.train_cfg,
            self.tokenizer,
            server_round=server_round,
            privacy=privacy,
        )


@dataclass
class Federation:
    """Both sides and the evaluation sets: what the in-process engine runs (`build_federation`)."""

    cfg: ExperimentConfig
    clients: Clients
    server: Server
    sets: dict[str, list[int]] = field(default_factory=dict)

    @property
    def strategy(self) -> Strategy:
        return self.server.strategy

    @property
    def ledger(self) -> PrivacyLedger | None:
        return self.server.ledger

    @property
    def specs(self) -> list[ClientSpec]:
        return self.clients.specs

    def evaluate_global(
        self, rnd: int, per_example: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """The global model on every evaluation set: a metrics row (``kind="eval"``) per set;
        each set's per-example values go to `per_example` (a row per set)."""
        from fedlora.clients.evaluate import evaluate_detailed

        cfg, c = self.cfg, self.clients
        rows = []
        with c.host.use_global(self.strategy.global_delta(), self.strategy.dense) as gmodel:
            for name, idx in self.sets.items():
                te = time.perf_counter()
                ev = evaluate_detailed(
                    gmodel,
                    c.tokenizer,
                    [c.examples[i] for i in idx],
                    cfg.eval.metrics,
                    batch_size=cfg.eval.batch_size,
                    max_new_tokens=cfg.eval.max_new_tokens,
                    max_length=cfg.train.max_length,
                    kind=cfg.model.kind,
                    labels=c.labels,
                    label_to_id=c.label_to_id,
                    per_task=cfg.eval.per_task,
                    precision=cfg.train.precision,
                    max_generations=cfg.eval.max_generations,
                    n_boot=cfg.eval.bootstrap,
                )
                te = time.perf_counter() - te
                rows.append(
                    {"kind": "eval", "round": rnd, "set": name, **ev.metrics, "time_eval": te}
                )
                if per_example is not None:
                    per_example.append({"round": rnd, "set": name, "example": idx, **ev.examples})
        return rows


def build_clients(cfg: ExperimentConfig) -> Clients:
    """Load the data, split it, load the model and give every client its spec (seeded)."""
    from fedlora.clients.evaluate import task_labels
    from fedlora.data import label_mapping

    where = placement(cfg)
    examples = load_data(cfg)
    split = build_split(cfg, examples)
    label_to_id = label_mapping(examples) if cfg.model.kind == "classifier" else None
    model, tokenizer = load_base_model(cfg, len(label_to_id) if label_to_id else None, where)
    host = build_host(cfg, model)
    return Clients(
        cfg=cfg,
        examples=examples,
        split=split,
        host=host,
        tokenizer=tokenizer,
        specs=client_specs(cfg, host.module_names(), host.shapes(), split.train),
        train_cfg=train_config(cfg),
        where=where,
        label_to_id=label_to_id,
        labels=task_labels(examples),
        secret=(
            seeded_secret(cfg.seed, "clients")
            if cfg.privacy.insecure_seeded_noise
            else draw_secret()
        ),
    )


def build_server(
    cfg: ExperimentConfig,
    shapes: dict[str, tuple[int, int]],
    specs: Sequence[ClientSpec],
    train_clients: Sequence[int],
    base_norm: float | None = None,
) -> Server:
    """The server side for the training clients `train_clients` (indices into `specs`):
    the strategy, the privacy ledger and the norm bounds of `cfg` (`base_norm`: the model's,
    `fedlora.clients.host.LoraHost.base_norm`, for the first-round lone bound)."""
    k = cfg.sampled_per_round()
    if k > len(train_clients):
        raise ConfigError(
            f"clients_per_round: {k} sampled per round but only {len(train_clients)} "
            "clients train; lower clients_per_round"
        )
    ledger = build_privacy(cfg, specs, train_clients)
    registered = {specs[c].client_id: specs[c].num_examples or 1 for c in train_clients}
    return Server(
        strategy=build_strategy(cfg, shapes, specs, ledger),
        bound=norm_bound(cfg, base_norm),
        weights=WeightBound(cfg.robust.max_weight_ratio, registered),
        ledger=ledger,
        fatal_drops=cfg.robust.fatal_drops,
        full_ft=full_ft_nbytes(shapes),
        shapes=dict(shapes),
        sampling=cfg.privacy.sampling if ledger is not None else "fixed",
    )


def model_norm(host: Any) -> float | None:
    """`LoraHost.base_norm` for the first-round lone bound; None (`NormBound`'s fallback 100,
    said in a warning) where quantized weights cannot be read back."""
    try:
        return host.base_norm()
    except Exception as e:  # noqa: BLE001 - a bitsandbytes layout this code does not know
        LOG.warning(
            "robust: cannot read the quantized base weights' norm (%s: %s); the first-round "
            "lone bound is robust.fallback_max_norm's default 100: set it for this model",
            type(e).__name__, e,
        )  # fmt: skip
        return None


def build_federation(cfg: ExperimentConfig) -> Federation:
    """`build_clients`, `build_server` and the evaluation sets of `cfg`."""
    clients = build_clients(cfg)
    host = clients.host
    server = build_server(
        cfg, host.shapes(), clients.specs, clients.train_clients, model_norm(host)
    )
    return Federation(cfg, clients, server, eval_sets(cfg, clients.split))
