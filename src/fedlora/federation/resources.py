"""Client resource heterogeneity after FlexLoRA (Bai et al., NeurIPS 2024). Pure python.

Four rank types: 1 = rank 8 everywhere, 2 = rank 30 everywhere, 3 = rank 30 on attention and
200 on MLP modules, 4 = rank 200 everywhere. Distributions of types over clients:

* ``uniform``: each type equally often (N // 4 each; the remainder goes to seeded types).
* ``heavy_tail_light``: ``round(share * N)`` clients at type 1, the rest spread evenly over 2-4.
* ``heavy_tail_strong``: ``round(share * N)`` clients at type 4, the rest spread over 1-3.
* ``normal``: a normal over the type positions 1..4 centred at 2.5 (``std`` 1 by default),
  discretised to exact counts by largest remainders: most clients at types 2 and 3.
* ``homogeneous``: every client at ``homogeneous_type`` (default 1: the "bucket effect" baseline
  where everyone trains at the smallest rank).
* ``custom``: per-client resources given by the user (sequence or ``{client_id: resource}``);
  a resource is a type number, a ``RankType`` / ``(attention_rank, mlp_rank)`` pair, or a
  ``{module_name: rank}`` mapping.

``share`` defaults to 0.85, as in the FlexLoRA README; the released code uses 0.80. Counts are
exact and the order of clients is a seeded shuffle.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import NamedTuple


class RankType(NamedTuple):
    """LoRA ranks of attention and MLP modules."""

    attention: int
    mlp: int


RANK_TYPES: dict[int, RankType] = {
    1: RankType(8, 8),
    2: RankType(30, 30),
    3: RankType(30, 200),
    4: RankType(200, 200),
}
DISTRIBUTIONS = (
    "uniform",
    "heavy_tail_light",
    "heavy_tail_strong",
    "normal",
    "homogeneous",
    "custom",
)
DEFAULT_SHARE = 0.85

Resource = int | RankType | tuple[int, int] | Mapping[str, int]

_ATTN_PARTS = re.compile(r"attn|attention")
_MLP_PARTS = re.compile(r"mlp|ffn|feed_?forward|intermediate|densereludense|experts?")
_ATTN_LEAVES = {
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value", "q", "k", "v",
    "o", "wq", "wk", "wv", "wo_attn", "c_attn", "out_proj", "query_key_value", "wqkv",
}  # fmt: skip
_MLP_LEAVES = {
    "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3", "wi", "wo",
    "wi_0", "wi_1", "dense_h_to_4h", "dense_4h_to_h", "gate_up_proj", "lin1", "lin2",
}  # fmt: skip


def module_kind(name: str) -> str | None:
    """Classify a module path as "attention" or "mlp" (None when unknown).

    A path component naming attention (``self_attn``, ``attention``, ``attn``) wins, so BERT's
    ``attention.output.dense`` and GPT-2's ``attn.c_proj`` are attention while
    ``intermediate.dense``, ``layer.0.output.dense`` and ``mlp.c_proj`` are MLP. Otherwise the
    last component decides (q_proj/k_proj/v_proj/o_proj/query/key/value vs gate_proj/up_proj/
    down_proj/fc1/fc2/...).
    """
    parts = name.lower().split(".")
    if any(_ATTN_PARTS.search(p) for p in parts[:-1]):
        return "attention"
    if any(_MLP_PARTS.search(p) for p in parts[:-1]):
        return "mlp"
    leaf = parts[-1]
    if leaf in _ATTN_LEAVES:
        return "attention"
    if leaf in _MLP_LEAVES:
        return "mlp"
    if len(parts) >= 2 and parts[-2:] == ["output", "dense"]:
        return "mlp"  # BERT layer.N.output.dense (the attention one matched above)
    return None


def _scaled(rank: int, module: str, divisor: float | None, cap_fraction: float | None,
            dims: Mapping[str, tuple[int, int]] | None) -> int:  # fmt: skip
    if divisor is not None:
        rank = max(1, round(rank / divisor))
    if cap_fraction is not None:
        if dims is None or module not in dims:
            raise ValueError(f"cap_fraction needs dims for module {module!r}")
        rank = min(rank, max(1, math.floor(cap_fraction * min(dims[module]))))
    return rank


def _check_rank(rank: object, where: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: rank must be a positive integer, got {rank!r}")
    return rank


def resource_ranks(
    resource: Resource,
    module_names: Sequence[str],
    *,
    divisor: float | None = None,
    cap_fraction: float | None = None,
    dims: Mapping[str, tuple[int, int]] | None = None,
    default_kind: str | None = None,
    rank_types: Mapping[int, RankType] | None = None,
) -> dict[str, int]:
    """Per-module ranks for one client's resource (a type number, RankType or module mapping).

    Scaling to a small model: ``divisor`` divides every rank (rounded, at least 1; e.g. 8 turns
    8/30/200 into 1/4/25), ``cap_fraction`` caps each rank at ``floor(cap_fraction * min(d_in,
    d_out))`` of the module (``dims[module] = (d_out, d_in)``). Both may be combined. Modules
    that :func:`module_kind` cannot classify raise unless ``default_kind`` names one.
    """
    if divisor is not None and not divisor > 0:
        raise ValueError(f"divisor must be > 0, got {divisor}")
    if cap_fraction is not None and not 0 < cap_fraction <= 1:
        raise ValueError(f"cap_fraction must be in (0, 1], got {cap_fraction}")
    types = RANK_TYPES if rank_types is None else rank_types
    if isinstance(resource, Mapping):
        missing = [m for m in module_names if m not in resource]
        if missing:
            raise ValueError(f"rank mapping has no rank for module {missing[0]!r}")
        raw = {m: _check_rank(resource[m], f"module {m!r}") for m in module_names}
    else:
        if isinstance(resource, tuple):
            rt = RankType(*resource)
        elif resource in types:
            rt = types[resource]
        else:
            raise ValueError(f"unknown rank type {resource!r}; known types: {sorted(types)}")
        raw = {}
        for m in module_names:
            kind = module_kind(m) or default_kind
            if kind not in ("attention", "mlp"):
                raise ValueError(
                    f"cannot tell whether module {m!r} is attention or MLP; pass default_kind"
                )
            raw[m] = _check_rank(getattr(rt, kind), f"rank type {resource!r}")
    return {m: _scaled(r, m, divisor, cap_fraction, dims) for m, r in raw.items()}


def _spread(n: int, types: Sequence[int], rng: random.Random) -> list[int]:
    """``n`` clients over ``types`` as evenly as possible; the remainder to seeded types."""
    out = [t for t in types for _ in range(n // len(types))]
    return out + sorted(rng.sample(list(types), n % len(types)))


def _normal_counts(n: int, std: float, rng: random.Random) -> list[int]:
    types = sorted(RANK_TYPES)
    centre = (len(types) + 1) / 2
    w = [math.exp(-0.5 * ((t - centre) / std) ** 2) for t in types]
    quotas = [n * x / sum(w) for x in w]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(types)), key=lambda i: (-(quotas[i] - counts[i]), rng.random()))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return [t for t, c in zip(types, counts) for _ in range(c)]


def _validate_custom(custom: object, num_clients: int) -> list[Resource]:
    if custom is None:
        raise ValueError("distribution 'custom' needs custom= (per-client types or ranks)")
    if isinstance(custom, Mapping):
        extra = [k for k in custom if not (isinstance(k, int) and 0 <= k < num_clients)]
        if extra:
            raise ValueError(f"custom: client id {extra[0]!r} is not in 0..{num_clients - 1}")
        absent = [c for c in range(num_clients) if c not in custom]
        if absent:
            raise ValueError(f"custom: no resource for client {absent[0]}")
        items = [custom[c] for c in range(num_clients)]
    else:
        items = list(custom)  # type: ignore[call-overload]
        if len(items) != num_clients:
            raise ValueError(f"custom: {len(items)} entries for num_clients={num_clients}")
    out: list[Resource] = []
    for c, r in enumerate(items):
        where = f"custom: client {c}"
        if isinstance(r, Mapping):
            for m, v in r.items():
                _check_rank(v, f"{where}, module {m!r}")
            out.append(dict(r))
        elif isinstance(r, tuple):
            if len(r) != 2:
                raise ValueError(f"{where}: expected (attention_rank, mlp_rank), got {r!r}")
            out.append(RankType(_check_rank(r[0], where), _check_rank(r[1], where)))
        elif isinstance(r, int) and not isinstance(r, bool) and r in RANK_TYPES:
            out.append(r)
        else:
            raise ValueError(
                f"{where}: {r!r} is not a rank type {sorted(RANK_TYPES)}, an "
                "(attention_rank, mlp_rank) pair or a {module: rank} mapping"
            )
    return out


def assign_resources(
    num_clients: int,
    distribution: str,
    *,
    share: float = DEFAULT_SHARE,
    seed: int = 0,
    custom: Sequence[Resource] | Mapping[int, Resource] | None = None,
    homogeneous_type: int = 1,
    std: float = 1.0,
) -> list[Resource]:
    """Assign a rank type (1-4) to each of ``num_clients`` clients; see the module docstring.

    Built-in distributions return type numbers; ``custom`` returns the validated user entries.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}"
        )
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    rng = random.Random(seed)
    types = sorted(RANK_TYPES)
    if distribution == "custom":
        return _validate_custom(custom, num_clients)
    if distribution == "uniform":
        out = _spread(num_clients, types, rng)
    elif distribution in ("heavy_tail_light", "heavy_tail_strong"):
        extreme = types[0] if distribution == "heavy_tail_light" else types[-1]
        m = round(share * num_clients)
        out = [extreme] * m + _spread(num_clients - m, [t for t in types if t != extreme], rng)
    elif distribution == "normal":
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        out = _normal_counts(num_clients, std, rng)
    else:
        if homogeneous_type not in RANK_TYPES:
            raise ValueError(f"homogeneous_type must be one of {types}, got {homogeneous_type!r}")
        out = [homogeneous_type] * num_clients
    rng.shuffle(out)
    return out  # type: ignore[return-value]


def client_ranks(
    resources: Sequence[Resource], module_names: Sequence[str], **options: object
) -> list[dict[str, int]]:
    """Per-client ``{module: rank}`` for assigned resources (options as :func:`resource_ranks`)."""
    return [resource_ranks(r, module_names, **options) for r in resources]  # type: ignore[arg-type]


def _label(r: Resource) -> str:
    if isinstance(r, Mapping):
        return "custom"
    if isinstance(r, tuple):
        return f"attn{r[0]}/mlp{r[1]}"
    return f"type{r}"


class ResourceSummary(dict):
    """Counts per resource label (``type1``..``type4``, ``attn30/mlp200``, ``custom``)."""

    def format(self) -> str:
        total = sum(self.values())
        rows = [f"{'resource':<16} {'clients':>7} {'share':>6}"]
        rows += [f"{k:<16} {v:>7} {v / total:>6.1%}" for k, v in self.items()]
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.format()


def resource_summary(resources: Sequence[Resource]) -> ResourceSummary:
    """Count clients per resource; ``print()`` it for a small table."""
    counts = Counter(_label(r) for r in resources)
    order = [f"type{t}" for t in sorted(RANK_TYPES)]
    keys = [k for k in order if k in counts] + sorted(k for k in counts if k not in order)
    return ResourceSummary((k, counts[k]) for k in keys)
