"""FlexLoRA: full-size aggregation of heterogeneous-rank LoRA, redistributed by SVD.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", NeurIPS 2024, sec. 3.2, eq. (2)-(3):

    W_g = sum_k p_k * scale_k * B_k A_k        (p_k proportional to n_k)
    W_g = U S V^T,   client k of rank r_k:  B_k = U_r S_r / scale_k,  A_k = V_r^T

W_g is the global model's delta (it replaces the previous one each round). The SVD is taken
from the stacked factors (`fedlora.core.linalg`), never by a dense d_out x d_in SVD unless the
summed rank makes the dense path cheaper. ``split="sqrt"`` puts sqrt(S) in both factors
instead of all of S into B (the authors' code does the latter). Unlike the released code,
every client really gets its own rank. A client whose rank exceeds the global delta's rank
gets fresh A rows orthonormal to the singular vectors (B = 0) in the extra slots, so they
train (zero A and B would get no gradient).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fedlora.core.contract import (
    Adapter,
    ClientSpec,
    ClientUpdate,
    FedLoraError,
    Payload,
    Strategy,
    module_seed,
)
from fedlora.core.linalg import LowRankSum, rank_r_factors
from fedlora.strategies import register
from fedlora.strategies.base import streamed_sums


@register
class FlexLoRA(Strategy):
    """Weighted sum of full deltas -> SVD -> best rank-r factors per client."""

    name = "flexlora"
    dp_released = "delta"

    @classmethod
    def option_problems(cls, options: Mapping[str, Any], privacy_mode: str = "none") -> list[str]:
        """Its options' values too, checked with the configuration (before a model loads)."""
        problems = super().option_problems(options, privacy_mode)
        if options.get("split", "B") not in ("B", "sqrt"):
            problems.append(f"strategy.options.split = {options['split']!r}: must be 'B' or 'sqrt'")
        r = options.get("dense_rank")
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 0):
            problems.append(f"strategy.options.dense_rank = {r!r}: must be an integer >= 0")
        return problems

    def __init__(self, *, split: str = "B", dense_rank: int | None = None, **options) -> None:
        super().__init__(**options)
        if split not in ("B", "sqrt"):
            raise ValueError(f"flexlora: split must be 'B' or 'sqrt', got {split!r}")
        self.split = split
        self.dense_rank = dense_rank
        self.sums: dict[str, LowRankSum] = {}
        self._svd: dict[str, tuple] = {}  # module -> (U, S, Vh) of the current global, cached

    def _triplets(self, module: str, r: int):
        cached = self._svd.get(module)
        if cached is None or (cached[1].numel() < r and self.sums[module].is_dense):
            s = self.sums[module]
            cached = s.svd(r) if s.is_dense else s.svd()
            self._svd[module] = cached
        return cached

    def configure(self, client: ClientSpec, server_round: int) -> Payload:
        if not self.sums:
            return self.expect(client, Payload(None, None, seed=self.seed))
        adapter = {}
        for module, r in client.ranks.items():
            if module not in self.sums:
                raise FedLoraError(
                    f"flexlora: client {client.client_id}: module {module!r} is not in the "
                    f"global model ({sorted(self.sums)[:3]} ...)"
                )
            U, S, Vh = self._triplets(module, r)
            # slots beyond the global delta's rank get fresh orthonormal A rows (B = 0)
            pad_seed = module_seed(self.seed, f"flexlora-pad/{module}", server_round)
            adapter[module] = rank_r_factors(
                U, S, Vh, r, client.scale(module), split=self.split, pad_seed=pad_seed
            )
        return self.expect(client, Payload(None, adapter, seed=self.seed))

    def aggregate(self, server_round: int, updates: Iterable[ClientUpdate]) -> None:
        # central DP releases the change from the global delta the clients started from
        previous = self.sums if self.privacy is not None else None
        self.sums = streamed_sums(self, server_round, updates, self.dense_rank, previous)
        self._svd = {}

    def global_delta(self) -> Adapter:
        return {m: s.factors() for m, s in self.sums.items()}
