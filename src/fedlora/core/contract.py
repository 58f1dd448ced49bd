"""The engine-agnostic contract between fedlora strategies, clients and engines.

This module is the extension point for new aggregation methods: subclass `Strategy`, implement
`configure`, `aggregate` and `global_delta`, and register it with
`fedlora.strategies.register`. It imports torch only: no transformers, no peft, no Flower.

Conventions
-----------
* One LoRA module is `LoraFactors(A, B, scale)` with A of shape (r, d_in), B of shape
  (d_out, r) and effective delta ``scale * B @ A`` (the same layout as peft's
  ``lora_A.weight`` / ``lora_B.weight``).
* An `Adapter` maps module names (e.g. ``"model.layers.0.self_attn.q_proj"``) to factors.
* Strategies aggregate effective deltas, never raw factors of different scales, so clients
  with different ranks and alphas combine correctly.
* ``dense`` (on `Payload` and `ClientUpdate`) maps parameter names (``"classifier.weight"``)
  to full tensors: small modules trained in full beside LoRA (a classifier head; peft's
  ``modules_to_save``). Every strategy averages them by weighted FedAvg
  (`Strategy.aggregate_dense`) next to its own LoRA rule.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

Trainable = frozenset[Literal["A", "B"]]
BOTH: Trainable = frozenset({"A", "B"})


class FedLoraError(ValueError):
    """Bad input to fedlora: the message names the client, module or option at fault."""


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA factors: delta = scale * B @ A, A (r, d_in), B (d_out, r)."""

    A: Tensor
    B: Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the module's weight."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def delta(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The dense effective delta ``scale * B @ A`` (d_out, d_in)."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))

    def scaled_B(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """``scale * B``: the factor that carries the scale, so that delta = scaled_B @ A."""
        return self.scale * self.B.to(dtype)

    def to(self, dtype: torch.dtype) -> LoraFactors:
        return LoraFactors(self.A.to(dtype), self.B.to(dtype), self.scale)

    def nbytes(self) -> int:
        return _nbytes(self.A) + _nbytes(self.B)


Adapter = dict[str, LoraFactors]


@dataclass(frozen=True)
class ClientSpec:
    """A client's description: its LoRA rank per module and its alpha.

    ``scale = alpha / r`` (or ``alpha / sqrt(r)`` with ``rslora``) per module, as in peft.
    ``alpha`` is one number for all modules or a mapping module -> alpha.
    """

    client_id: str
    ranks: Mapping[str, int]
    alpha: float | Mapping[str, float] = 16.0
    rslora: bool = False
    num_examples: int | None = None
    resource_type: int | None = None

    def __post_init__(self) -> None:
        if not self.ranks:
            raise FedLoraError(f"client {self.client_id}: ranks is empty")
        for module, r in self.ranks.items():
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise FedLoraError(
                    f"client {self.client_id}, module {module}: rank must be a positive "
                    f"integer, got {r!r}"
                )
            a = self.alpha_of(module)
            if not math.isfinite(a) or a <= 0:
                raise FedLoraError(
                    f"client {self.client_id}, module {module}: alpha must be > 0, got {a!r}"
                )

    def alpha_of(self, module: str) -> float:
        if isinstance(self.alpha, Mapping):
            if module not in self.alpha:
                raise FedLoraError(f"client {self.client_id}: no alpha for module {module}")
            return float(self.alpha[module])
        return float(self.alpha)

    def scale(self, module: str) -> float:
        """The LoRA scale of `module` for this client (alpha/r, or alpha/sqrt(r) for rsLoRA)."""
        r = self.ranks[module]
        return self.alpha_of(module) / (math.sqrt(r) if self.rslora else r)


@dataclass
class ClientUpdate:
    """What a client returns after local training.

    ``adapter`` holds the client's trained factors (for LoRA-A2 only the selected slots, with
    their indices in ``extras["slots"]``); ``dense`` the full tensors it trained beside LoRA
    (a classifier head), parameter name -> tensor; ``extras`` carries method-specific tensors
    and the training metrics (floats).
    """

    client_id: str
    adapter: Adapter
    num_examples: int
    extras: dict[str, Any] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Payload:
    """What a client receives before local training.

    * ``merge``: factors to fold into the frozen base weights before training (None if
      nothing). Always relative to the original base: clients are stateless.
    * ``adapter``: initial LoRA factors in the client's own ranks; None for a module (or for all)
      means "initialise fresh with `init_lora` and ``seed``".
    * ``trainable``: which of A and B the client trains this round.
    * ``extras``: client-side instructions of a method (LoRA-A2's slot budget, HetLoRA's
      pruning options).
    * ``dense``: the global values of the full trainable tensors (a classifier head),
      parameter name -> tensor; a name that is missing means "the base model's own value"
      (the first round, before any client trained it).
    """

    merge: Adapter | None
    adapter: Adapter | None
    trainable: Trainable = BOTH
    seed: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)


class Strategy(ABC):
    """An aggregation method. Subclasses implement the three steps below.

    Options common to every strategy:
      * ``weighting``: ``"num_examples"`` (default: weights proportional to each update's
        ``num_examples``) or ``"uniform"``.
      * ``seed``: seeds any factors the server initialises.
      * ``shapes``: optional mapping module -> (d_out, d_in); strategies that must initialise
        factors before any update (FFA-LoRA's shared A, LoRA-A2's global A/B) require it.
    """

    name: ClassVar[str] = ""
    #: clients may upload fewer slots than configured (HetLoRA's self-pruning)
    rank_may_shrink: ClassVar[bool] = False
    #: what central DP clips and noises (`fedlora.core.privacy`): "factors", "B", "trained",
    #: "delta"; empty: the strategy refuses central DP (`dp_refusal` says why)
    dp_released: ClassVar[str] = ""
    dp_refusal: ClassVar[str] = "it does not implement central DP"
    #: averages A and B separately, so every client must train the same ranks
    homogeneous_only: ClassVar[bool] = False
    #: options the engine sets from the experiment (never the user's)
    engine_options: ClassVar[frozenset[str]] = frozenset({"shapes", "seed"})

    def dp_scale(self, client: ClientSpec, module: str) -> float:
        """The LoRA scale `client` trains `module` at (central DP bounds B's change in the
        client's own units)."""
        return client.scale(module)

    @classmethod
    def option_names(cls) -> set[str] | None:
        """Keyword options the class accepts (its ``__init__`` chain up to `Strategy`), or
        None when one of them takes arbitrary keywords that do not reach `Strategy`."""
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters.values()
            kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            names |= {q.name for q in params if q.kind in kinds} - {"self"}
            if not any(q.kind is q.VAR_KEYWORD for q in params):
                return names
        return names

    @classmethod
    def option_problems(cls, options: Mapping[str, Any], privacy_mode: str = "none") -> list[str]:
        """What is wrong with `options` (``strategy.options``) for this method under
        ``privacy.mode`` `privacy_mode`, one message per problem naming its key; subclasses
        add their own rules (calling this first)."""
        problems = []
        accepted = cls.option_names()
        for key in options:
            if key in cls.engine_options:
                problems.append(f"strategy.options.{key}: set by the engine; remove it")
            elif accepted is not None and key not in accepted:
                hint = difflib.get_close_matches(key, sorted(accepted), n=1)
                problems.append(
                    f"strategy.options.{key}: {cls.name} has no option {key!r}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                    + f" (options: {', '.join(sorted(accepted - cls.engine_options))})"
                )
        if privacy_mode == "central" and not cls.dp_released:
            problems.append(
                f"privacy.mode = 'central': strategy {cls.name} refuses it: {cls.dp_refusal}"
            )
        return problems

    def held_options(self) -> dict[str, Any]:
        """The method's options as this built strategy holds them (each stored under its own
        name; the engine's are left out), so `option_problems` checks a strategy built in code
        by the same rules as a configuration."""
        names = (self.option_names() or set()) - self.engine_options
        return {n: getattr(self, n) for n in sorted(names) if hasattr(self, n)}

    def __init__(
        self,
        *,
        weighting: Literal["num_examples", "uniform"] = "num_examples",
        seed: int = 0,
        shapes: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        if weighting not in ("num_examples", "uniform"):
            raise FedLoraError(
                f"{self.name}: weighting must be 'num_examples' or 'uniform', got {weighting!r}"
            )
        self.weighting = weighting
        self.seed = int(seed)
        self.shapes = {m: (int(s[0]), int(s[1])) for m, s in (shapes or {}).items()}
        # ranks handed to each client by `configure`, checked against its update
        self.expected_ranks: dict[str, dict[str, int]] = {}
        # central DP (`fedlora.core.privacy.CentralDP`, set by the engine) and, while it is on, the
        # factors each configured client started from this round (its update is clipped
        # relative to them)
        self.privacy: Any = None
        self.dp_starts: dict[str, Adapter] = {}
        # global dense tensors (classifier head), float64, FedAvg of the clients' (see
        # `aggregate_dense`); empty until a client sends some
        self.dense: dict[str, Tensor] = {}

    @abstractmethod
    def configure(self, client: ClientSpec, server_round: int) -> Payload:
        """Build the payload for `client` in round `server_round` (1-based)."""

    @abstractmethod
    def aggregate(self, server_round: int, updates: Iterable[ClientUpdate]) -> None:
        """Fold the round's client updates into the server state."""

    @abstractmethod
    def global_delta(self) -> Adapter:
        """The global model's delta from the original base weights, factored (scale 1)."""

    def begin_round(self, server_round: int) -> None:
        """Called by an engine before a round's `configure` calls: forgets per-client records
        of an earlier round that never reached `aggregate` (central DP's starts)."""
        self.dp_starts = {}

    # -- helpers shared by the strategies -------------------------------------------------

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        """Normalised aggregation weights of `updates` (sum to 1; under central DP each is the
        fixed 1 / clients_per_round)."""
        if self.privacy is not None:
            return [self.privacy.weight] * len(updates)
        if self.weighting == "uniform":
            return [1.0 / len(updates)] * len(updates)
        total = sum(u.num_examples for u in updates)
        return [u.num_examples / total for u in updates]

    def expect(self, client: ClientSpec, payload: Payload) -> Payload:
        """Remember the ranks `payload` hands `client`, so its update can be checked, and give
        the payload the global dense tensors (`with_dense`)."""
        if payload.adapter is not None:
            self.expected_ranks[client.client_id] = {m: f.rank for m, f in payload.adapter.items()}
        else:
            self.expected_ranks[client.client_id] = dict(client.ranks)
        if self.privacy is not None:
            start = payload_start(client, payload, self.shapes, self.name)
            self.dp_starts[client.client_id] = start
        return self.with_dense(payload)

    def with_dense(self, payload: Payload) -> Payload:
        """`payload` carrying float32 copies of the global dense tensors (a classifier head)."""
        payload.dense = {k: v.to(torch.float32).clone() for k, v in self.dense.items()}
        return payload

    def aggregate_dense(self, server_round: int, updates: Iterable[ClientUpdate]) -> None:
        """Weighted FedAvg of the updates' dense tensors into ``self.dense`` (float64), with
        the ``weighting`` option's weights (data sizes or uniform, never a method's own LoRA
        weights). Every strategy calls it beside its LoRA rule, after its own checks; a
        streaming strategy uses `dense_mean` and `commit_dense` inside its one pass."""
        acc = self.dense_mean(server_round)
        for u in updates:
            acc.add(u, self.raw_weight(u))
        self.commit_dense(acc)

    def dense_mean(self, server_round: int) -> DenseMean:
        """An empty accumulator for the round's dense tensors, checked against the global."""
        return DenseMean(f"{self.name}: round {server_round}", self.dense)

    def commit_dense(self, acc: DenseMean) -> None:
        """Make the accumulated mean the global dense tensors (unchanged if none were sent)."""
        mean = acc.mean()
        if mean is not None and self.privacy is not None:
            raise FedLoraError(
                f"{self.name}: central DP covers the LoRA deltas only, not dense tensors (a "
                "classifier head); set model.modules_to_save = [] to run it"
            )
        if mean is not None:
            self.dense = mean

    def check_updates(
        self, server_round: int, updates: Iterable[ClientUpdate], *, same_modules: bool = True
    ) -> list[ClientUpdate]:
        """Validate a round's updates before they touch server state (see `validate_updates`),
        and that each client trained the ranks it was configured with."""
        return list(self.iter_checked(server_round, updates, same_modules=same_modules))

    def iter_checked(
        self, server_round: int, updates: Iterable[ClientUpdate], *, same_modules: bool = True
    ) -> Iterator[ClientUpdate]:
        """`check_updates` one update at a time (for strategies that aggregate as a stream).
        Under central DP a round may have no update: it still releases noise."""
        for u in iter_valid_updates(
            server_round,
            updates,
            shapes=self.shapes,
            strategy=self.name,
            same_modules=same_modules,
            allow_empty=self.privacy is not None,
        ):
            self.check_update(server_round, u)
            yield u

    def check_update(self, server_round: int, update: ClientUpdate) -> None:
        """Checks of one (already well-formed) update that need this strategy's state; raise
        `FedLoraError` naming the client. By default: the client trained the ranks it was
        configured with. Subclasses extend it (FFA-LoRA's frozen A, LoRA-A2's slots), so that
        `check_update` (the module function) can drop one bad client before aggregation.
        Under central DP also `fedlora.core.privacy.check_private_update` (scales, finiteness)."""
        if self.privacy is not None:  # a `fedlora.core.privacy.CentralDP`
            self.privacy.check_upload(self, server_round, update)
        self.check_dense(server_round, update)
        expected = self.expected_ranks.get(update.client_id, {})
        for module, f in update.adapter.items():
            if module not in expected or f.rank == expected[module]:
                continue
            if not (self.rank_may_shrink and 1 <= f.rank < expected[module]):
                raise FedLoraError(
                    f"{self.name}: round {server_round}, client {update.client_id}, module "
                    f"{module}: rank {f.rank}, but it was configured with rank "
                    f"{expected[module]}"
                )

    def check_dense(self, server_round: int, update: ClientUpdate) -> None:
        """The update's dense tensors (a classifier head): finite, and the global ones' names
        and shapes once there are global ones (`DenseMean` checks them across clients)."""
        DenseMean(f"{self.name}: round {server_round}", self.dense).add(update, 1.0)
        if self.dense and update.dense and set(update.dense) != set(self.dense):
            diff = sorted(set(update.dense) ^ set(self.dense))
            raise FedLoraError(
                f"{self.name}: round {server_round}, client {update.client_id}: dense tensors "
                f"differ from the global ones in {diff[:3]}"
            )

    def raw_weight(self, update: ClientUpdate) -> float:
        """Unnormalised aggregation weight (streaming strategies divide by the sum at the end)."""
        return 1.0 if self.weighting == "uniform" or self.privacy else float(update.num_examples)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this strategy exactly (tensors, counters, options); not
        its central DP mechanism (``privacy``), which the engine attaches from the config."""
        return copy.deepcopy({k: v for k, v in vars(self).items() if k != "privacy"})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        vars(self).update(copy.deepcopy({k: v for k, v in state.items() if k != "privacy"}))


class DenseMean:
    """Streaming weighted mean of the updates' dense tensors (float64).

    Every update must send the same names with the same shapes (those of `reference`, the
    global tensors, when it has them), finite values; errors name `where`, the client and the
    tensor. Updates with no dense tensors at all are allowed only if none has any.
    """

    def __init__(self, where: str, reference: Mapping[str, Tensor] | None = None) -> None:
        self.where = where
        self.shapes = {k: tuple(v.shape) for k, v in (reference or {}).items()}
        self.sums: dict[str, Tensor] = {}
        self.first: str | None = None
        self.total = 0.0
        self.count = 0

    def add(self, update: ClientUpdate, weight: float) -> None:
        who = f"{self.where}, client {update.client_id}"
        dense = dict(update.dense or {})
        if self.count and set(dense) != set(self.sums):
            diff = sorted(set(dense) ^ set(self.sums))
            raise FedLoraError(
                f"{who}: sent dense tensors {sorted(dense)[:3]} but client {self.first} sent "
                f"{sorted(self.sums)[:3]} (differ in {diff[:3]})"
            )
        for name, t in dense.items():
            if not isinstance(t, Tensor):
                raise FedLoraError(f"{who}, dense {name}: expected a tensor, got {type(t)}")
            shape = self.shapes.setdefault(name, tuple(t.shape))
            if tuple(t.shape) != shape:
                raise FedLoraError(f"{who}, dense {name}: shape {tuple(t.shape)}, expected {shape}")
            if not torch.isfinite(t).all():
                raise FedLoraError(f"{who}, dense {name}: contains NaN or Inf")
            acc = self.sums.setdefault(name, torch.zeros(shape, dtype=torch.float64))
            acc.add_(t.detach().to(torch.float64), alpha=float(weight))
        if self.first is None:
            self.first = update.client_id
        self.total += float(weight)
        self.count += 1

    def mean(self) -> dict[str, Tensor] | None:
        """The weighted mean, or None when no update carried dense tensors."""
        if not self.sums or self.total <= 0:
            return None
        return {k: v / self.total for k, v in self.sums.items()}


# -- validation ---------------------------------------------------------------------------


def validate_updates(
    server_round: int,
    updates: Iterable[ClientUpdate],
    *,
    shapes: Mapping[str, tuple[int, int]] | None = None,
    strategy: str = "",
    same_modules: bool = True,
    allow_empty: bool = False,
) -> list[ClientUpdate]:
    """Check a round's updates: non-empty (unless `allow_empty`), positive sizes, finite
    factors, consistent shapes.

    Module shapes (d_out, d_in) must agree with `shapes` (when given) and across clients; with
    `same_modules`, every client must send the same modules. Every error names the round, the
    client and the module.
    """
    return list(
        iter_valid_updates(
            server_round,
            updates,
            shapes=shapes,
            strategy=strategy,
            same_modules=same_modules,
            allow_empty=allow_empty,
        )
    )


def iter_valid_updates(
    server_round: int,
    updates: Iterable[ClientUpdate],
    *,
    shapes: Mapping[str, tuple[int, int]] | None = None,
    strategy: str = "",
    same_modules: bool = True,
    allow_empty: bool = False,
) -> Iterator[ClientUpdate]:
    """`validate_updates` one update at a time, so a strategy can stream over a round without
    holding every update: each is checked against the shapes and modules seen before it."""
    where = f"{strategy}: round {server_round}" if strategy else f"round {server_round}"
    seen: dict[str, tuple[int, int]] = dict(shapes or {})
    ids: set[str] = set()
    first: tuple[str, set[str]] | None = (
        None  # (client, modules) of the first update, not the update
    )
    for u in updates:
        who = f"{where}, client {u.client_id}"
        if u.client_id in ids:
            raise FedLoraError(f"{who}: sent more than one update")
        ids.add(u.client_id)
        n = u.num_examples
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise FedLoraError(f"{who}: num_examples must be a positive int, got {n!r}")
        if not isinstance(u.adapter, dict):
            raise FedLoraError(f"{who}: adapter must be a dict, got {type(u.adapter).__name__}")
        for module, f in u.adapter.items():
            check_factors(f, f"{who}, module {module}")
            check_update_factors(f, f"{who}, module {module}")
            if shapes and module not in shapes:
                raise FedLoraError(f"{who}: unknown module {module!r}")
            expected = seen.setdefault(module, f.shape)
            if f.shape != expected:
                raise FedLoraError(
                    f"{who}, module {module}: weight shape (d_out, d_in) = {f.shape}, "
                    f"expected {expected}"
                )
        if first is None:
            first = (u.client_id, set(u.adapter))
        elif same_modules and set(u.adapter) != first[1]:
            diff = set(u.adapter) ^ first[1]
            raise FedLoraError(
                f"{where}: client {u.client_id} and client {first[0]} sent different "
                f"modules ({sorted(diff)[:3]} ...)"
            )
        yield u
    if first is None and not allow_empty:
        raise FedLoraError(f"{where}: no client updates to aggregate")


def check_update(
    strategy: Strategy,
    server_round: int,
    spec: ClientSpec,
    payload: Payload,
    update: ClientUpdate,
    *,
    shapes: Mapping[str, tuple[int, int]] | None = None,
) -> None:
    """Everything one client's update can be checked for on its own, against the payload it
    was trained from: its client id, finite float metrics (``train_loss``), finite factors of
    the model's shapes (`shapes`, default the strategy's), the modules it was sent (LoRA-A2
    may upload a subset) and the strategy's own checks (`Strategy.check_update`). Raises
    `FedLoraError` with the reason.

    Both engines call it on each update before it reaches `Strategy.aggregate`, so a bad
    update drops its client instead of failing the round (or a streamed aggregation); the
    strategy's `iter_checked` stays as the last line of defence.
    """
    who = f"{strategy.name}: round {server_round}, client {spec.client_id}"
    if update.client_id != spec.client_id:
        raise FedLoraError(f"{who}: update claims client {update.client_id!r}")
    for name in ("extras", "dense"):
        if not isinstance(getattr(update, name), dict):
            raise FedLoraError(f"{who}: {name} must be a dict")
    for key, value in update.extras.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise FedLoraError(f"{who}: {key} is {value}")
    validate_updates(
        server_round,
        [update],
        shapes=shapes or strategy.shapes or None,
        strategy=strategy.name,
        same_modules=False,
    )
    sent = set(payload.adapter) if payload.adapter is not None else set(spec.ranks)
    if "budget" in payload.extras or "slots" in payload.extras:  # a subset of the modules
        extra = set(update.adapter) - sent
        if extra:
            raise FedLoraError(f"{who}: uploaded modules it was not sent: {sorted(extra)[:3]}")
    elif set(update.adapter) != sent:
        diff = sorted(set(update.adapter) ^ sent)
        raise FedLoraError(f"{who}: modules {diff[:3]} differ from its payload's")
    strategy.check_update(server_round, update)


def check_update_factors(f: LoraFactors, who: str) -> None:
    """What a client's uploaded factors must be beyond well-formed: float32 tensors (what every
    client trains and sends) and a positive finite scale (a negative one flips the delta)."""
    for name, t in (("A", f.A), ("B", f.B)):
        if t.dtype != torch.float32:
            dtype = str(t.dtype).removeprefix("torch.")
            raise FedLoraError(f"{who}: {name} is {dtype}, expected float32")
    if isinstance(f.scale, bool) or not (math.isfinite(f.scale) and f.scale > 0):
        raise FedLoraError(f"{who}: scale must be a finite number > 0, got {f.scale!r}")


def check_factors(f: LoraFactors, who: str) -> None:
    """Raise a FedLoraError naming `who` unless `f` is a well-formed, finite factor pair."""
    if not isinstance(f, LoraFactors):
        raise FedLoraError(f"{who}: expected LoraFactors, got {type(f).__name__}")
    if not (isinstance(f.A, Tensor) and isinstance(f.B, Tensor)):
        raise FedLoraError(f"{who}: A and B must be tensors")
    if not isinstance(f.scale, (int, float)):
        raise FedLoraError(f"{who}: scale must be a number, got {type(f.scale).__name__}")
    if f.A.ndim != 2 or f.B.ndim != 2:
        raise FedLoraError(
            f"{who}: A and B must be 2-D, got {tuple(f.A.shape)}, {tuple(f.B.shape)}"
        )
    if f.A.shape[0] != f.B.shape[1]:
        raise FedLoraError(
            f"{who}: rank mismatch, A has {f.A.shape[0]} rows but B has {f.B.shape[1]} columns"
        )
    if not math.isfinite(f.scale):
        raise FedLoraError(f"{who}: scale is not finite ({f.scale})")
    for name, t in (("A", f.A), ("B", f.B)):
        if not torch.isfinite(t).all():
            raise FedLoraError(f"{who}: {name} contains NaN or Inf")


# -- initialisation -------------------------------------------------------------------------


def module_seed(seed: int, module: str, row: int = 0) -> int:
    """A stable 63-bit seed for (seed, module, row), independent of Python's hash salt."""
    digest = hashlib.blake2b(f"{seed}/{module}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_lora_A(
    seed: int, module: str, rank: int, d_in: int, first_row: int = 0, dtype=torch.float32
) -> Tensor:
    """Rows ``first_row .. first_row+rank`` of a module's shared LoRA A.

    peft's default init, ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)).
    Each row has its own seed, so the first r rows are the same whatever rank is asked for:
    clients of different ranks that start from one seed share their leading rows.
    """
    bound = 1.0 / math.sqrt(d_in)
    rows = []
    for i in range(first_row, first_row + rank):
        g = torch.Generator().manual_seed(module_seed(seed, module, i))
        rows.append(torch.rand(d_in, generator=g, dtype=torch.float64) * (2 * bound) - bound)
    if not rows:
        return torch.zeros(0, d_in, dtype=dtype)
    return torch.stack(rows).to(dtype)


def init_lora(
    seed: int, module: str, rank: int, shape: tuple[int, int], scale: float, dtype=torch.float32
) -> LoraFactors:
    """Fresh LoRA factors as peft initialises them: A from `init_lora_A`, B = 0."""
    d_out, d_in = shape
    return LoraFactors(
        init_lora_A(seed, module, rank, d_in, dtype=dtype),
        torch.zeros(d_out, rank, dtype=dtype),
        scale,
    )


# -- communication ------------------------------------------------------------------------


def _nbytes(x: Any) -> int:
    if isinstance(x, Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, LoraFactors):
        return x.nbytes()
    if isinstance(x, Mapping):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


def payload_nbytes(payload: Payload) -> int:
    """Bytes a client downloads: merge and adapter factors, dense tensors and tensors in
    extras."""
    return (
        _nbytes(payload.merge or {})
        + _nbytes(payload.adapter or {})
        + _nbytes(payload.dense or {})
        + _nbytes(payload.extras)
    )


def update_nbytes(update: ClientUpdate, trainable: Trainable = BOTH) -> int:
    """Bytes a client uploads: only the factors it trained (the server holds the frozen ones),
    plus its dense tensors and tensors in extras (LoRA-A2's slot indices)."""
    n = sum(
        (_nbytes(f.A) if "A" in trainable else 0) + (_nbytes(f.B) if "B" in trainable else 0)
        for f in update.adapter.values()
    )
    return n + _nbytes(update.dense or {}) + _nbytes(update.extras)


def payload_start(
    client: Any, payload: Any, shapes: Mapping[str, tuple[int, int]], name: str
) -> Adapter:
    """The factors `client` starts from with `payload`: its adapter, or a fresh `init_lora`
    for modules it leaves to the client (clients are stateless, so this is all it has)."""
    given = dict(payload.adapter or {})
    out: Adapter = {}
    for m, r in client.ranks.items():
        f = given.get(m)
        if f is not None:
            out[m] = f
            continue
        if m not in shapes:
            raise FedLoraError(
                f"{name}: central DP needs the module shapes (the `shapes` option) to know the "
                f"fresh factors client {client.client_id} starts module {m} from"
            )
        out[m] = init_lora(payload.seed, m, r, shapes[m], client.scale(m), torch.float64)
    return out
