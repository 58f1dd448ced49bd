"""One typed, validated experiment configuration.

A configuration is a tree of dataclasses loaded from TOML (a file, or one of the built-in
presets in ``fedlora/federation/presets/``), with command-line style overrides on top::

    cfg = load_config("demo", overrides={"rounds": 5, "strategy.name": "flexlora"})
    cfg = override(cfg, "train.lr", "3e-4")        # a string parsed to the field's type
    print(dumps_toml(cfg))                         # the resolved configuration

Every problem (unknown key, wrong type, impossible value, a strategy that cannot run on the
configured resources) raises `ConfigError` naming the key and the fix, before any model is
loaded. Validation imports torch only (through the strategy registry), never transformers.

A TOML file may start from a preset with ``extends = "demo"`` and override some keys.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union

from fedlora.clients.device import DEVICE_PATTERN
from fedlora.core.contract import FedLoraError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 with tomli installed
    import tomli as tomllib  # type: ignore[no-redef]

PRESET_DIR = Path(__file__).parent / "presets"

PARTITIONS = ("natural", "dirichlet", "pathological", "iid")
METRICS = ("loss", "perplexity", "rouge_l", "accuracy", "f1")
DEFAULT_METRICS = ("loss", "rouge_l", "accuracy", "f1")
TINY_MODELS = ("tiny-llama", "tiny-bert")
# strategies that average A and B separately and so need one rank for every client
NUM_TYPES = 4  # resource types of fedlora.federation.resources


class ConfigError(FedLoraError):
    """An invalid configuration: the message names the key and how to fix it."""


# -- the sections ---------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The base model and the LoRA modules put on it."""

    name: str = "smollm2"  # "smollm2" | "minilm" | "tiny-llama" | "tiny-bert" | path | hub id
    kind: Literal["causal", "classifier"] = "causal"
    target_modules: list[str] | None = None  # None: the model's default attention/MLP modules
    # trained in full, FedAvg'd beside LoRA (peft's modules_to_save), e.g. ["classifier"]
    modules_to_save: list[str] | None = None  # None: a classifier's head; []: frozen head
    # a BERT-style classifier's pooling: "first" token (the model's own pooler) or "mean"
    pooling: Literal["first", "mean"] = "first"
    alpha: float = 16.0  # LoRA alpha: scale = alpha / rank (alpha / sqrt(rank) with rslora)
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank)
    dropout: float = 0.0  # LoRA dropout during local training
    save_merged: bool = False  # also write the base model with the final delta merged in
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # storage; auto: as precision
    quantization: Literal["none", "8bit", "4bit"] = "none"  # bitsandbytes; 4bit: NF4, double quant


@dataclass
class DataConfig:
    """Where the examples come from and how they are split over clients."""

    source: str = "builtin"  # "builtin", a .jsonl/.json/.csv file, or a dataset name
    columns: dict[str, str] = field(default_factory=dict)  # field -> column of the source
    tasks: list[str] | None = None  # None: every task of the source
    partition: Literal["natural", "dirichlet", "pathological", "iid"] = "natural"
    dirichlet_alpha: float = 0.5  # "dirichlet": concentration; smaller is more skewed
    classes_per_client: int = 2  # "pathological": labels per client
    num_clients: int = 8  # clients in the federation (held-out ones included)
    heldout_clients: float = 0.0  # fraction of clients never trained on, evaluated as unseen
    heldout_tasks: list[str] = field(default_factory=list)  # loaded, but no client trains on
    test_fraction: float = 0.1  # each client's held-out share (evaluation of seen clients)
    max_examples_per_client: int | None = None  # cap each client's training examples
    # a flwr-datasets partitioner instead of `partition`: "flwr_datasets:DirichletPartitioner"
    partitioner: str | None = None  # "flwr_datasets:<Class>" (docs/data.md); None: partition
    partitioner_options: dict[str, Any] = field(default_factory=dict)  # its keyword options


@dataclass
class ResourcesConfig:
    """Clients' LoRA ranks: one of four resource types per client
    (`fedlora.federation.resources`, after FlexLoRA), drawn from a distribution; each type
    has a rank per attention / MLP module."""

    distribution: Literal[
        "uniform", "heavy_tail_light", "heavy_tail_strong", "normal", "homogeneous", "custom"
    ] = "uniform"
    share: float | None = None  # heavy_tail_*: share of clients at the extreme type
    custom_share: list[float] | None = None  # "custom": share of clients per type (4 numbers)
    ranks: list[int] | None = None  # rank of types 1-4 (None: FlexLoRA's 8/30/30|200/200)
    mlp_ranks: list[int] | None = None  # MLP-module ranks of types 1-4 (None: as `ranks`)
    homogeneous_type: int | None = None  # "homogeneous": every client gets this type (1-4) ...
    homogeneous_rank: int | None = None  # ... or exactly this rank on every module
    rank_divisor: float | None = None  # divide every rank (at least 1): small models
    rank_cap_fraction: float | None = None  # cap ranks at this fraction of min(d_out, d_in)


@dataclass
class StrategyConfig:
    """The aggregation method and its options (passed to `fedlora.strategies.get`)."""

    name: str = "flexlora"  # one of fedlora.strategies.names()
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {split = "sqrt"} for flexlora


@dataclass
class TrainSection:
    """Local training of one client per round (`fedlora.clients.train.TrainConfig`; its seed is the
    experiment's)."""

    local_steps: int = 10  # optimizer steps per client per round
    epochs: int | None = None  # passes over the client's data instead of local_steps
    batch_size: int = 4  # examples per local step
    lr: float = 3e-4  # AdamW learning rate
    b_lr_multiplier: float = 1.0  # B's learning rate = lr * this (LoRA+ / LoRA-A2 style)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the gradient norm at this value (0: no clipping)
    max_length: int = 128  # tokens per example (the prompt is truncated first)
    device: str = "auto"  # "auto" (cuda, else mps, else cpu) | "cpu" | "cuda" | "cuda:N" | "mps"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"  # autocast; auto: bf16 if native
    grad_accum_steps: int = 1  # micro-batches of batch_size per optimizer step
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"  # over a client's steps
    warmup_steps: int = 0  # linear warm-up steps at the start of each client's local training
    compile: bool = False  # torch.compile the training forward: pays off over long local runs
    # "auto": 1 on a CPU (measured: a group does not pay there), sized from free CUDA memory
    parallel_clients: int | Literal["auto"] = 1  # clients trained together in one pass


@dataclass
class EvalConfig:
    """What is evaluated, how often, on how much data."""

    every: int = 1  # evaluate every N rounds (and always after the last round)
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))  # any of METRICS
    max_examples: int = 64  # per evaluated client set
    batch_size: int = 8  # evaluation batch size
    max_new_tokens: int = 32  # greedy generation length for Rouge-L
    max_generations: int | None = None  # Rouge-L on this many generation examples (None: all)
    bootstrap: int = 1000  # bootstrap resamples of every metric's 95% CI over examples (0: none)
    seen_clients: bool = True  # held-out test split of the clients that train
    unseen_clients: bool = True  # clients held out of training (data.heldout_clients)
    unseen_tasks: bool = True  # tasks held out of training (data.heldout_tasks)
    per_task: bool = True  # also a breakdown per task


@dataclass
class RobustConfig:
    """Defences against bad clients (`fedlora.core.robust`): a client whose update fails a check or
    whose contribution norm ||delta - start delta||_F is over a bound is dropped for the round."""

    max_update_norm: float | None = None  # absolute bound on a client's contribution norm
    max_norm_ratio: float = 20.0  # bound: this x the others' median norm in the round; 0: off
    # a client without round-mates, before any accepted round: this absolute bound (default:
    # 0.25 x the adapted base weights' Frobenius norm, `fedlora.core.robust.first_round_norm`);
    # 0: none
    fallback_max_norm: float | None = None
    # the lone bound grows at most this x a round, and to at most lone_max_growth x round 1's
    lone_growth: float = 2.0
    lone_max_growth: float = 4.0
    # a client whose count the server does not know weighs at most this x the median count
    max_weight_ratio: float = 4.0
    action: Literal["reject", "clip"] = "reject"  # an update over a bound: drop it, or clip it
    fatal_drops: bool = False  # stop the run at the first dropped client (debugging)

    def bound(self, base_norm: float | None = None):
        """These bounds as the `fedlora.core.robust.NormBound` both engines screen with;
        `base_norm` (the adapted base weights' Frobenius norm) sets the first-round lone bound
        when ``fallback_max_norm`` is not given (neither: `NormBound`'s default)."""
        from fedlora.core.robust import DEFAULT_FALLBACK_NORM, NormBound, first_round_norm

        first = self.fallback_max_norm
        if first is None:
            first = DEFAULT_FALLBACK_NORM if base_norm is None else first_round_norm(base_norm)
        return NormBound(
            self.max_update_norm,
            self.max_norm_ratio or None,
            self.action,
            first or None,
            self.lone_growth,
            self.lone_max_growth,
        )


@dataclass
class PrivacyConfig:
    """Differential privacy (`fedlora.core.privacy`, docs/privacy.md): client-level on the server
    ("central") or sample-level DP-SGD on each client ("local")."""

    mode: Literal["none", "central", "local"] = "none"  # central: server-side; local: DP-SGD
    # central: bound on a client's update ("adaptive": follows a quantile of the update norms,
    # Andrew et al. 2021); local: on an example's gradient
    clip_norm: float | Literal["adaptive"] = 1.0
    noise_multiplier: float | None = None  # noise std / clip_norm (or set target_epsilon)
    target_epsilon: float | None = None  # solve noise_multiplier for this epsilon over the run
    delta: float | None = None  # none: 1 / (10 n), n = training clients or largest client's data
    accountant: Literal["rdp", "prv"] = "rdp"  # Opacus's RDP or PRV accountant
    # clients drawn independently with probability clients_per_round / N (add/remove
    # neighbours), or exactly clients_per_round of them (replace-one neighbours)
    sampling: Literal["poisson", "fixed"] = "poisson"
    # noise and sampling from the public seed: reproducible, and NOT private (tests, debugging)
    insecure_seeded_noise: bool = False
    adaptive_initial_clip: float = 0.1  # clip_norm = "adaptive": the first round's clip norm
    adaptive_quantile: float = 0.5  # ... the quantile of update norms it tracks
    adaptive_lr: float = 0.2  # ... its geometric learning rate
    adaptive_count_noise: float | None = None  # ... the count's noise std (none: max(K/20, z))


BACKENDS = ("tensorboard", "mlflow", "wandb")
#: the largest privacy.noise_multiplier accepted (see `_privacy_problems`)
MAX_NOISE_MULTIPLIER = 1e4


@dataclass
class TrackingConfig:
    """Experiment trackers (`fedlora.federation.tracking`, docs/tracking.md): the config,
    every round's metrics and the run's files to TensorBoard, MLflow or W&B."""

    backends: list[str] = field(default_factory=list)  # any of "tensorboard", "mlflow", "wandb"
    project: str = "fedlora"  # MLflow experiment and W&B project
    per_client: bool = False  # also each client's train loss, update norm, clip and drop
    artifacts: bool = True  # upload the adapter, plots and compare tables
    mlflow_uri: str | None = None  # None: sqlite:///<run dir's parent>/mlflow.db (embedded)
    wandb_mode: Literal["offline", "online"] = "offline"  # online needs `wandb login`
    wandb_entity: str | None = None  # W&B user or team (online)

    def problems(self) -> list[str]:
        """What is wrong with these settings, each naming its ``tracking.`` key."""
        p = []
        for i, name in enumerate(self.backends):
            if name not in BACKENDS:
                p.append(
                    f"tracking.backends[{i}] = {name!r}: unknown backend "
                    f"(backends: {', '.join(BACKENDS)})"
                )
        if len(set(self.backends)) != len(self.backends):
            p.append(f"tracking.backends = {self.backends}: a backend is listed twice")
        if not self.project.strip():
            p.append("tracking.project: must not be empty (e.g. 'fedlora')")
        return p


@dataclass
class ExperimentConfig:
    """A whole experiment."""

    name: str = "experiment"  # a label for logs and tables
    rounds: int = 3  # communication rounds
    clients_per_round: int | float = 4  # an int: count; a float in (0, 1]: fraction
    seed: int = 0  # seeds partition, resources, sampling, initialisation and training
    output_dir: str = "runs/experiment"  # the run directory (metrics, plots, checkpoints)
    threads: int = 0  # torch threads; 0: all cores
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # -- derived values -------------------------------------------------------------------

    def num_train_clients(self) -> int:
        """Clients that train (the rest are held out as unseen clients)."""
        return self.data.num_clients - self.num_heldout_clients()

    def num_heldout_clients(self) -> int:
        if self.data.heldout_clients <= 0:
            return 0
        return max(1, round(self.data.heldout_clients * self.data.num_clients))

    def sampled_per_round(self) -> int:
        """Clients sampled each round."""
        c = self.clients_per_round
        if isinstance(c, float):
            return max(1, round(c * self.num_train_clients()))
        return int(c)

    def heterogeneous(self) -> bool:
        """Whether clients may get different ranks."""
        r = self.resources
        if r.distribution == "homogeneous":
            return False
        types = [
            (a, b)
            for a, b in zip(
                r.ranks or [8, 30, 30, 200], r.mlp_ranks or r.ranks or [8, 30, 200, 200]
            )
        ]
        if r.distribution == "custom" and r.custom_share is not None:
            types = [t for t, s in zip(types, r.custom_share) if s > 0]
        return len({a for a, _ in types} | {b for _, b in types}) > 1 or len(set(types)) > 1


# -- loading --------------------------------------------------------------------------------


def preset_names() -> list[str]:
    """The built-in presets (``fedlora/federation/presets/*.toml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _read_toml(source: str | Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], str]:
    """The raw table of a preset name or a TOML file, with ``extends`` resolved (`chain`: the
    files that extend this one, to refuse a cycle)."""
    path = Path(source)
    if not path.suffix and (PRESET_DIR / f"{source}.toml").is_file() and not path.is_file():
        path = PRESET_DIR / f"{source}.toml"
    if not path.is_file():
        hint = difflib.get_close_matches(str(source), preset_names(), n=1)
        fix = (
            f"did you mean the preset {hint[0]!r}?"
            if hint
            else (f"give a TOML file or a preset: {', '.join(preset_names())}")
        )
        raise ConfigError(f"config {str(source)!r}: no such file or preset; {fix}")
    here = path.resolve()
    if here in chain:
        cycle = " -> ".join(str(p) for p in (*chain, here))
        raise ConfigError(f"config {path}: extends itself ({cycle})")
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read it: {e.strerror or e}") from None
    base = raw.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: extends must be a preset name or a path")
        parent_path = base if base in preset_names() else path.parent / base
        parent, _ = _read_toml(parent_path, (*chain, here))
        raw = _merge(parent, raw)
    return raw, str(path)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    validate: bool = True,
) -> ExperimentConfig:
    """A validated configuration from a preset name, a TOML path or a mapping (default: the
    ``demo`` preset), with dotted-key `overrides` applied (see `apply_overrides`)."""
    if source is None:
        source = "demo"
    if isinstance(source, Mapping):
        cfg = from_dict(source)
    else:
        raw, _ = _read_toml(source)
        cfg = from_dict(raw)
    if overrides:
        cfg = apply_overrides(cfg, overrides, validate=False)
    if validate:
        validate_config(cfg)
    return cfg


def load_preset(name: str, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    if name not in preset_names():
        hint = difflib.get_close_matches(name, preset_names(), n=1)
        raise ConfigError(
            f"preset {name!r} does not exist"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
            + f" (presets: {', '.join(preset_names())})"
        )
    return load_config(name, overrides)


# -- dict <-> dataclasses -------------------------------------------------------------------


def all_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the configuration, e.g. ``"train.lr"``."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        path = f"{prefix}{f.name}"
        if is_dataclass(hints[f.name]):
            out += all_keys(hints[f.name], path + ".")
        else:
            out.append(path)
    return out


def _unknown(path: str, key: str, names: list[str]) -> ConfigError:
    local = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    every = difflib.get_close_matches(path, all_keys(), n=1, cutoff=0.6)
    by_leaf = [k for k in all_keys() if k.rsplit(".", 1)[-1] == key]
    if local:
        fix = f"did you mean {path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{local[0]}?"
    elif by_leaf:
        fix = f"did you mean {by_leaf[0]}?"
    elif every:
        fix = f"did you mean {every[0]}?"
    else:
        fix = f"valid keys here: {', '.join(names)}"
    return ConfigError(f"unknown key {path!r}; {fix}")


def from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """Build an `ExperimentConfig` from a nested mapping; unknown keys and wrong types raise."""
    return _build(ExperimentConfig, data, "")


def _build(cls: type, data: Any, prefix: str):
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{prefix or 'config'}: expected a table, got {type(data).__name__} {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = _unknown_keys(cls, data, prefix) if not prefix else []
    if len(unknown) > 1:
        raise ConfigError(f"{len(unknown)} unknown keys: " + "; ".join(unknown))
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise _unknown(path, str(key), names)
        tp = hints[key]
        kwargs[key] = _build(tp, value, path) if is_dataclass(tp) else _coerce(value, tp, path)
    return cls(**kwargs)


def _unknown_keys(cls: type, data: Any, prefix: str) -> list[str]:
    """Every unknown key of `data` (and of its tables), each with its hint."""
    if not isinstance(data, Mapping):
        return []
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    out = []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            out.append(str(_unknown(path, str(key), names)))
        elif is_dataclass(hints[key]):
            out += _unknown_keys(hints[key], value, path)
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a table"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the field type `tp` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        # an exact type match first, so that `int | float` keeps ints as ints
        for a in sorted(args, key=lambda a: a is not type(value)):
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # Optional[X]: X's own message names the inner key
            raise errors[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if value not in args:
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            raise ConfigError(
                f"{path}: {value!r} is not one of {', '.join(repr(a) for a in args)}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a table, got {_describe(value)}")
        return {str(k): _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this module does not handle
        raise TypeError(f"{path}: unsupported field type {tp!r}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def to_dict(cfg: Any) -> dict[str, Any]:
    """The configuration as a nested dict of plain values (None kept)."""
    return dataclasses.asdict(cfg)


def _field_type(dotted: str) -> Any:
    cls: Any = ExperimentConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not is_dataclass(cls):
            # below a free-form table (strategy.options.x, data.columns.x): any value
            return Any
        hints = typing.get_type_hints(cls)
        names = [f.name for f in fields(cls)]
        if part not in names:
            raise _unknown(".".join(parts[: i + 1]), part, names)
        cls = hints[part]
    return cls


# -- overrides ------------------------------------------------------------------------------


def parse_value(text: str, tp: Any = Any) -> Any:
    """Parse a command-line string for a field of type `tp`.

    TOML literals are accepted (``5``, ``3e-4``, ``true``, ``[1, 2]``, ``{a = 1}``); for lists a
    bare comma-separated ``a,b`` works too; ``none``/``null`` gives None for optional fields;
    strings need no quotes.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    s = text.strip()
    if s.lower() in ("none", "null") and (tp is Any or type(None) in args):
        return None
    if tp is str or (origin is Literal and all(isinstance(a, str) for a in args)):
        return s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" else s
    if tp is bool or (origin in (Union, types.UnionType) and bool in args):
        low = s.lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
    try:
        return tomllib.loads(f"v = {s}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(s)
    except ValueError:
        pass
    list_type = (
        tp if origin is list else next((a for a in args if typing.get_origin(a) is list), None)
    )
    if list_type is not None:
        inner = typing.get_args(list_type)[0]
        return [parse_value(p, inner) for p in s.split(",") if p.strip()] if s else []
    return s


def override(cfg: ExperimentConfig, dotted_key: str, value: str, *, validate: bool = True):
    """A copy of `cfg` with `dotted_key` set to the string `value` parsed to the field's type
    (``override(cfg, "train.lr", "1e-3")``; ``strategy.options.split=sqrt`` sets an option)."""
    tp = _field_type(dotted_key)
    return apply_overrides(cfg, {dotted_key: parse_value(value, tp)}, validate=validate)


def apply_overrides(
    cfg: ExperimentConfig, overrides: Mapping[str, Any], *, validate: bool = True
) -> ExperimentConfig:
    """A copy of `cfg` with dotted keys set: ``{"rounds": 5, "strategy.name": "flexlora"}``.

    String values are parsed to the field's type (as `override` does); other values are
    type-checked. A whole section may be given as a mapping (``{"train": {"lr": 1e-3}}``).
    """
    data = to_dict(cfg)
    unknown = []
    for dotted in overrides:
        try:
            _field_type(dotted)
        except ConfigError as e:
            unknown.append(str(e))
    if len(unknown) > 1:  # every one of them, not the first
        raise ConfigError(f"{len(unknown)} unknown keys: " + "; ".join(unknown))
    for dotted, value in overrides.items():
        tp = _field_type(dotted)
        if isinstance(value, str):
            value = parse_value(value, tp)
        parts = dotted.split(".")
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if isinstance(value, Mapping) and isinstance(node.get(parts[-1]), dict):
            if dotted in ("strategy.options", "data.columns", "data.partitioner_options"):
                node[parts[-1]] = dict(value)
            else:
                node[parts[-1]] = _merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    out = from_dict(_drop_none(data))
    if validate:
        validate_config(out)
    return out


def _drop_none(d: Any) -> Any:
    # lossless: every optional key defaults to None (tests/test_config.py checks this), so an
    # explicit none and an absent key mean the same
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


# -- validation -----------------------------------------------------------------------------


def validate_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Raise `ConfigError` listing every problem (each naming its key and the fix)."""
    problems = _problems(cfg)
    if problems:
        if len(problems) == 1:
            raise ConfigError(problems[0])
        raise ConfigError(
            f"{len(problems)} problems in the configuration:\n  - " + "\n  - ".join(problems)
        )
    return cfg


class _Problems(list):
    """The problems found so far, one message each (naming its key and the fix)."""

    def need(self, ok: bool, msg: str) -> None:
        if not ok:
            self.append(msg)

    def fraction(self, key: str, v: float, lo_open: bool = True, hi_closed: bool = True) -> None:
        lo = v > 0 if lo_open else v >= 0
        hi = v <= 1 if hi_closed else v < 1
        if not (lo and hi and math.isfinite(v)):
            interval = ("(" if lo_open else "[") + "0, 1" + ("]" if hi_closed else ")")
            self.append(f"{key} = {v}: must be a fraction in {interval}")


def _problems(cfg: ExperimentConfig) -> list[str]:
    """Every problem of `cfg`, section by section."""
    p = _Problems()
    p.need(cfg.rounds >= 1, f"rounds = {cfg.rounds}: must be >= 1")
    p.need(cfg.threads >= 0, f"threads = {cfg.threads}: must be >= 0 (0 = all cores)")
    p.need(bool(cfg.output_dir), "output_dir: must not be empty")
    for section in (
        _model_problems,
        _data_problems,
        _sampling_problems,
        _resources_problems,
        _train_problems,
        _eval_problems,
        _robust_problems,
        _strategy_problems,
        _privacy_problems,
        _tracking_problems,
    ):
        section(cfg, p)
    return p


def _tracking_problems(cfg: ExperimentConfig, p: _Problems) -> None:
    p += cfg.tracking.problems()
    d = cfg.data
    if d.partitioner is not None or d.partitioner_options:
        from fedlora.data.flwr_partition import partitioner_problems

        p += partitioner_problems(d.partitioner, d.partitioner_options)


def _model_problems(cfg: ExperimentConfig, p: _Problems) -> None:
    m = cfg.model
    p.need(bool(m.name), "model.name: must not be empty (e.g. 'smollm2', 'minilm', 'tiny-llama')")
    p.need(m.alpha > 0 and math.isfinite(m.alpha), f"model.alpha = {m.alpha}: must be > 0")
    p.need(0 <= m.dropout < 1, f"model.dropout = {m.dropout}: must be in [0, 1)")
    if m.target_modules is not None:
        p.need(len(m.target_modules) > 0, "model.target_modules: empty; leave it out for defaults")
    if m.modules_to_save is not None:
        p.need(
            all(isinstance(x, str) and x for x in m.modules_to_save),
            f"model.modules_to_save = {m.modules_to_save!r}: must be module names",
        )
    p.need(
        m.pooling in ("first", "mean"), f"model.pooling = {m.pooling!r}: choose 'first' or 'mean'"
    )
    p.need(
        m.pooling == "first" or m.kind == "classifier",
        f"model.pooling = {m.pooling!r}: only for model.kind = 'classifier'",
    )
    if m.name in ("tiny-bert", "minilm"):
        p.need(
            m.kind == "classifier", f"model.kind: {m.name} is an encoder; set kind = 'classifier'"
        )
    if m.name in ("tiny-llama", "smollm2"):
        p.need(m.kind == "causal", f"model.kind: {m.name} is a causal LM; set kind = 'causal'")
    if m.quantization != "none":
        p.need(
            m.name not in TINY_MODELS,
            f"model.quantization = {m.quantization!r}: {m.name} is built in memory; quantize a "
            "saved model (model.name = a path or hub id)",
        )


def _data_problems(cfg: ExperimentConfig, p: _Problems) -> None:
    d = cfg.data
    p.need(d.num_clients >= 1, f"data.num_clients = {d.num_clients}: must be >= 1")
    p.need(
        d.dirichlet_alpha > 0 and math.isfinite(d.dirichlet_alpha),
        f"data.dirichlet_alpha = {d.dirichlet_alpha}: must be > 0 (small = skewed)",
    )
    p.need(d.classes_per_client >= 1, f"data.classes_per_client = {d.classes_per_client}: >= 1")
    p.fraction("data.test_fraction", d.test_fraction, hi_closed=False)
    p.fraction("data.heldout_clients", d.heldout_clients, lo_open=False, hi_closed=False)
    if d.max_examples_per_client is not None:
        p.need(
            d.max_examples_per_client >= 1,
            f"data.max_examples_per_client = {d.max_examples_per_client}: must be >= 1 "
            "(leave it out for no limit)",
        )
    if d.tasks is not None:
        p.need(len(d.tasks) > 0, "data.tasks: empty; leave it out for every task")
        missing = sorted(set(d.heldout_tasks) - set(d.tasks))
        p.need(
            not missing,
            f"data.heldout_tasks: {missing} are not in data.tasks; add them there "
            "(data.tasks lists every task loaded, held-out ones included)",
        )
        p.need(
            set(d.tasks) - set(d.heldout_tasks) != set(),
            "data.heldout_tasks: every task in data.tasks is held out; keep one to train on",
        )
    if d.num_clients >= 1 and d.heldout_clients > 0:
        p.need(
            cfg.num_train_clients() >= 1,
            f"data.heldout_clients = {d.heldout_clients} leaves no training client; lower it",
        )


def _sampling_problems(cfg: ExperimentConfig, p: _Problems) -> None:
    c, d = cfg.clients_per_round, cfg.data
    if isinstance(c, float):
        p.fraction("clients_per_round", c)
        return
    p.need(c >= 1, f"clients_per_round = {c}: must be >= 1 (or a fraction in (0, 1])")
    n = cfg.num_train_clients()
    p.need(
        c <= n,
        f"clients_per_round = {c}: more than the {n} training clients "
        f"(data.num_clients = {d.num_clients}"
        + (f", {cfg.num_heldout_clients()} held out" if cfg.num_heldout_clients() else "")
        + f"); lower it to <= {n} or raise data.num_clients",
    )


def _resources_problems(cfg: ExperimentConfig, p: _Problems) -> None:
    r = cfg.resources
    for key in ("ranks", "mlp_ranks", "custom_share"):
        v = getattr(r, key)
        if v is not None:
            p.need(
                len(v) == NUM_TYPES,
                f"resources.{key} has {len(v)} entries; give one per resource type "
                f"({NUM_TYPES}), or leave it out for the defaults",
            )
    for key in ("ranks", "mlp_ranks"):
        for i, k in enumerate(getattr(r, key) or []):
            p.need(k >= 1, f"resources.{key}[{i}] = {k}: a LoRA rank must be >= 1")
    if r.rank_divisor is not None:
        p.need(
            r.rank_divisor > 0 and math.isfinite(r.rank_divisor),
            f"resources.rank_divisor = {r.rank_divisor}: must be > 0",
        )
    for key in ("rank_cap_fraction", "share"):
        if getattr(r, key) is not None:
            p.fraction(f"resources.{key}", getattr(r, key))
    if r.homogeneous_rank is not None:
        p.need(
            r.homogeneous_rank >= 1,
            f"resources.homogeneous_rank = {r.homogeneous_rank}: a LoRA rank must be >= 1",
        )
    if r.homogeneous_type is not None:
        p.need(
            1 <= r.homogeneous_type <= NUM_TYPES,
            f"resources.homogeneous_type = {r.homogeneous_type}: must be a type 1..{NUM_TYPES}",
        )
    _distribution_problems(r, p)


def _distribution_problems(r: ResourcesConfig, p: _Problems) -> None:
    if r.distribution != "homogeneous":
        for key in ("homogeneous_rank", "homogeneous_type"):
            p.need(
                getattr(r, key) is None,
                f"resources.{key}: only used with distribution = 'homogeneous' (it is "
                f"{r.distribution!r}); remove it or set resources.distribution = 'homogeneous'",
            )
    if r.distribution == "custom":
        if r.custom_share is None:
            p.append(
                "resources.custom_share: required with distribution = 'custom' (a share of "
                f"clients per type, {NUM_TYPES} numbers)"
            )
        else:
            p.need(
                all(x >= 0 for x in r.custom_share) and sum(r.custom_share) > 0,
                f"resources.custom_share = {r.custom_share}: shares must be >= 0, not all 0",
            )
    elif r.custom_share is not None:
        p.append(
            f"resources.custom_share: only used with distribution = 'custom' (it is "
            f"{r.distribution!r}); remove it or set resources.distribution = 'custom'"
        )


def _train_problems(cfg: ExperimentConfig, p: _Problems) -> None:
    t = cfg.train
    p.need(t.local_steps >= 1, f"train.local_steps = {t.local_steps}: must be >= 1")
    p.need(t.batch_size >= 1, f"train.batch_size = {t.batch_size}: must be >= 1")
    p.need(t.lr > 0 and math.isfinite(t.lr), f"train.lr = {t.lr}: must be > 0")
    p.need(t.weight_decay >= 0, f"train.weight_decay = {t.weight_decay}: must be >= 0")
    p.need(t.max_length >= 8, f"train.max_length = {t.max_length}: must be >= 8 tokens")
    if t.epochs is not None:
        p.need(t.epochs >= 1, f"train.epochs = {t.epochs}: must be >= 1 (or none: local_steps)")
    p.need(t.b_lr_multiplier > 0, f"train.b_lr_multiplier = {t.b_lr_multiplier}: must be > 0")
    p.need(t.grad_clip >= 0, f"train.grad_clip = {t.grad_clip}: must be >= 0 (0: no clipping)")
    p.need(
        bool(DEVICE_PATTERN.match(t.device)),
        f"train.device = {t.device!r}: choose 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
    )
    p.need(
        t.grad_accum_steps >= 1, f"train.grad_accum_steps = {t.grad_accum_steps}: must be >= 1"
    )
    p.need(t.warmup_steps >= 0, f"train.warmup_steps = {t.warmup_steps}: must be >= 0")
    p.need(
        t.parallel_clients == "auto" or t.parallel_clients >= 1,
        f"train.parallel_clients = {t.parallel_clients!r}: must be an integer >= 1 or 'auto'",
    )
    if t.epochs is None:
        p.need(
            t.warmup_steps < t.local_steps or t.warmup_steps == 0,
            f"train.warmup_steps = {t.warmup_steps}: must be below train.local_steps "
            f"({t.local_steps}), or the schedule never leaves warm-up",
        )


def _eval_problems(cfg: ExperimentConfig, p: _Problems) -> None:
    e = cfg.eval
    p.need(e.every >= 1, f"eval.every = {e.every}: must be >= 1")
    p.need(e.max_examples >= 1, f"eval.max_examples = {e.max_examples}: must be >= 1")
    p.need(e.batch_size >= 1, f"eval.batch_size = {e.batch_size}: must be >= 1")
    p.need(e.max_new_tokens >= 1, f"eval.max_new_tokens = {e.max_new_tokens}: must be >= 1")
    if e.max_generations is not None:
        p.need(
            e.max_generations >= 1,
            f"eval.max_generations = {e.max_generations}: must be >= 1 (none: every example)",
        )
    p.need(e.bootstrap >= 0, f"eval.bootstrap = {e.bootstrap}: must be >= 0 (0: no CIs)")
    for i, name in enumerate(e.metrics):
        if name not in METRICS:
            hint = difflib.get_close_matches(name, METRICS, n=1)
            p.append(
                f"eval.metrics[{i}] = {name!r}: unknown metric"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" (metrics: {', '.join(METRICS)})"
            )


def _robust_problems(cfg: ExperimentConfig, p: _Problems) -> None:
    rb = cfg.robust
    if rb.max_update_norm is not None:
        p.need(
            rb.max_update_norm > 0 and math.isfinite(rb.max_update_norm),
            f"robust.max_update_norm = {rb.max_update_norm}: must be a number > 0 (leave it "
            "out for no absolute bound)",
        )
    p.need(
        rb.max_norm_ratio >= 0 and math.isfinite(rb.max_norm_ratio),
        f"robust.max_norm_ratio = {rb.max_norm_ratio}: must be a number >= 0 (0: no relative "
        "bound)",
    )
    if rb.fallback_max_norm is not None:
        p.need(
            rb.fallback_max_norm >= 0 and math.isfinite(rb.fallback_max_norm),
            f"robust.fallback_max_norm = {rb.fallback_max_norm}: must be a number >= 0 (0: "
            "none; leave it out for the model's value)",
        )
    for key in ("lone_growth", "lone_max_growth"):
        v = getattr(rb, key)
        p.need(math.isfinite(v) and v >= 1, f"robust.{key} = {v}: must be a number >= 1")
    p.need(
        rb.max_weight_ratio >= 1 and math.isfinite(rb.max_weight_ratio),
        f"robust.max_weight_ratio = {rb.max_weight_ratio}: must be a number >= 1",
    )


def _local_dp_conflicts(t: TrainSection) -> list[tuple[str, bool, str]]:
    """The train settings local DP-SGD cannot use: (key, allowed?, the rule)."""
    return [
        ("grad_accum_steps", t.grad_accum_steps == 1, "1 (a DP-SGD step is one Poisson batch)"),
        ("gradient_checkpointing", not t.gradient_checkpointing, "false (Opacus hooks)"),
        ("compile", not t.compile, "false (Opacus hooks)"),
        ("lr_scheduler", t.lr_scheduler == "constant", "'constant'"),
        ("warmup_steps", t.warmup_steps == 0, "0"),
        ("precision", t.precision != "fp16", "not 'fp16' (no gradient scaler under DP-SGD)"),
    ]


def _privacy_problems(cfg: ExperimentConfig, p: _Problems) -> None:
    v = cfg.privacy
    if v.mode == "none":
        return
    if v.clip_norm == "adaptive":
        _adaptive_problems(cfg, p)
    else:
        p.need(
            v.clip_norm > 0 and math.isfinite(v.clip_norm),
            f"privacy.clip_norm = {v.clip_norm}: must be > 0",
        )
    p.need(
        (v.noise_multiplier is None) != (v.target_epsilon is None),
        f"privacy.mode = {v.mode!r}: set exactly one of privacy.noise_multiplier and "
        "privacy.target_epsilon",
    )
    if v.noise_multiplier is not None:
        p.need(
            v.noise_multiplier > 0 and math.isfinite(v.noise_multiplier),
            f"privacy.noise_multiplier = {v.noise_multiplier}: must be > 0 in a DP mode "
            "(0 releases the data unprotected: set privacy.mode = 'none')",
        )
        # the accountants' arithmetic overflows past ~1e154 (OverflowError from Opacus at
        # 1e308) and turns unstable before; epsilon stops falling long before 1e4
        p.need(
            not v.noise_multiplier > MAX_NOISE_MULTIPLIER,
            f"privacy.noise_multiplier = {v.noise_multiplier:g}: must be at most "
            f"{MAX_NOISE_MULTIPLIER:g} (more noise no longer lowers epsilon, and the "
            "accountant cannot compute it)",
        )
    if v.target_epsilon is not None:
        p.need(
            v.target_epsilon > 0 and math.isfinite(v.target_epsilon),
            f"privacy.target_epsilon = {v.target_epsilon}: must be > 0",
        )
    if v.delta is not None:
        p.need(0 < v.delta < 1, f"privacy.delta = {v.delta}: must be in (0, 1)")
    p.need(
        not (v.accountant == "prv" and v.sampling == "fixed" and v.mode == "central"),
        "privacy.accountant = 'prv' accounts Poisson sampling only; with privacy.sampling = "
        "'fixed' use privacy.accountant = 'rdp' (dp_accounting, replace-one neighbours)",
    )
    m = cfg.model
    head = m.modules_to_save if m.modules_to_save is not None else (
        ["the classifier head"] if m.kind == "classifier" else []
    )  # fmt: skip
    p.need(
        not head,
        f"privacy.mode = {v.mode!r}: {', '.join(head)} (model.modules_to_save) would be "
        "trained in full and released without protection; set model.modules_to_save = [] "
        "(the head stays as initialised) or privacy.mode = 'none'",
    )
    p.need(
        not cfg.tracking.per_client,
        f"tracking.per_client = true: with privacy.mode = {v.mode!r} each client's loss and "
        "update norm would go to the trackers unnoised (the epsilon does not cover them); "
        "set tracking.per_client = false",
    )
    if v.mode == "local":
        for key, ok, rule in _local_dp_conflicts(cfg.train):
            p.need(ok, f"train.{key}: must be {rule} with privacy.mode = 'local'")


def _adaptive_problems(cfg: ExperimentConfig, p: _Problems) -> None:
    v = cfg.privacy
    p.need(
        v.mode == "central",
        "privacy.clip_norm = 'adaptive': only with privacy.mode = 'central' (DP-SGD clips "
        "examples at a fixed norm)",
    )
    p.need(
        v.adaptive_initial_clip > 0 and math.isfinite(v.adaptive_initial_clip),
        f"privacy.adaptive_initial_clip = {v.adaptive_initial_clip}: must be > 0",
    )
    p.fraction("privacy.adaptive_quantile", v.adaptive_quantile, hi_closed=False)
    p.need(
        v.adaptive_lr > 0 and math.isfinite(v.adaptive_lr),
        f"privacy.adaptive_lr = {v.adaptive_lr}: must be > 0",
    )
    sigma_b, z = v.adaptive_count_noise, v.noise_multiplier
    if sigma_b is not None:
        p.need(
            sigma_b > 0 and (z is None or 2 * sigma_b > z),
            f"privacy.adaptive_count_noise = {sigma_b}: must be > 0 and above half the noise "
            "multiplier (the rest of the noise goes to the update)",
        )


def _strategy_problems(cfg: ExperimentConfig, p: _Problems) -> None:
    """The strategy's name, and what the strategy itself says of its options and of the
    resources and privacy it is run with (`Strategy.option_problems`, `homogeneous_only`)."""
    import fedlora.strategies as registry  # torch only

    s = cfg.strategy
    if s.name not in registry.names():
        hint = difflib.get_close_matches(s.name, registry.names(), n=1)
        p.append(
            f"strategy.name = {s.name!r}: unknown strategy"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
            + f" (strategies: {', '.join(registry.names())})"
        )
        return
    cls = registry.get_class(s.name)
    if cls.homogeneous_only and cfg.heterogeneous():
        p.append(
            f"strategy.name = {s.name!r} averages A and B separately and needs one rank for "
            f"every client, but resources.distribution = {cfg.resources.distribution!r} gives "
            "heterogeneous ranks; set resources.distribution = 'homogeneous' (with "
            "resources.homogeneous_rank or homogeneous_type) or use "
            + ", ".join(n for n in registry.names() if not registry.get_class(n).homogeneous_only)
        )
    p += cls.option_problems(s.options, cfg.privacy.mode)


# -- dumping --------------------------------------------------------------------------------


def dumps_json(cfg: ExperimentConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def dumps_toml(cfg: ExperimentConfig | Mapping[str, Any]) -> str:
    """The resolved configuration as TOML (None values are left out: they are the defaults)."""
    data = cfg if isinstance(cfg, Mapping) else to_dict(cfg)
    lines: list[str] = []
    _toml_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _toml_table(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if v is not None and not isinstance(v, Mapping)}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if path and (scalars or not tables):
        lines.append("")
        lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
    for k, v in scalars.items():
        lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in tables.items():
        _toml_table(v, [*path, k], lines)


def _toml_key(k: str) -> str:
    if k and all(c.isalnum() or c in "_-" for c in k):
        return k
    return json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, Mapping):
        inner = ", ".join(
            f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None
        )
        return "{ " + inner + " }" if inner else "{}"
    raise ConfigError(f"cannot write {v!r} ({type(v).__name__}) to TOML")


def diff(a: ExperimentConfig, b: ExperimentConfig, ignore=("output_dir", "threads")) -> list[str]:
    """Dotted keys whose values differ between two configurations (ignoring `ignore`)."""
    fa, fb = _flatten(to_dict(a)), _flatten(to_dict(b))
    keys = sorted(set(fa) | set(fb))
    return [
        k
        for k in keys
        if fa.get(k) != fb.get(k) and k.split(".")[0] not in ignore and k not in ignore
    ]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, path + "."))
        else:
            out[path] = v
    return out
