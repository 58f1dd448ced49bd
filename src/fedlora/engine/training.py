"""How the in-process engine trains a round's clients: one by one, or with
``train.parallel_clients`` > 1 in groups on the one base model
(`fedlora.clients.parallel.train_clients_together`), as a stream of
`fedlora.federation.rounds.Reply` in client order, so a streaming aggregation holds at most
one group's updates. A group that cannot be batched (local DP-SGD, ``train.compile``, ...)
trains one by one, with a log line. A client that raises (a non-finite loss included)
answers with the error and is dropped by the round's close.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fedlora.core.contract import ClientUpdate, FedLoraError
from fedlora.federation import rounds

LOG = logging.getLogger("fedlora.engine")

#: "auto" never groups more clients than this (the benchmark's largest measured group)
MAX_AUTO_WIDTH = 16


def auto_width(model: torch.nn.Module, device: torch.device, batch_size: int, length: int) -> int:
    """``parallel_clients = "auto"``: 1 on a CPU or MPS (benchmarks/parallel_clients.py: a
    group is no faster there), else as many clients as half the free accelerator memory holds
    by a rough activation estimate: per token and layer 34 bytes per hidden unit (Korthikanti
    et al., 16-bit activations), plus float32 logits, their softmax and gradient."""
    if device.type != "cuda":
        return 1
    cfg = getattr(model, "config", None)
    hidden = int(getattr(cfg, "hidden_size", 1024))
    layers = int(getattr(cfg, "num_hidden_layers", 24))
    vocab = int(getattr(cfg, "vocab_size", 32000))
    per_client = batch_size * length * (34 * hidden * layers + 12 * vocab)
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, min(MAX_AUTO_WIDTH, int(0.5 * free // per_client)))


def parallel_width(fed: Any) -> int:
    """How many clients train together (``train.parallel_clients``, "auto" resolved once)."""
    width = fed.cfg.train.parallel_clients
    if width != "auto":
        return int(width)
    w = getattr(fed, "auto_parallel_width", None)
    if w is None:  # resolved on the first round, then kept for the run
        t, host = fed.cfg.train, fed.clients.host
        w = auto_width(host.model, host.device, t.batch_size, t.max_length)
        LOG.info("train.parallel_clients = 'auto': %d clients per group on %s", w, host.device)
        fed.auto_parallel_width = w
    return w


def local_dp(fed: Any):
    """The simulated clients' DP-SGD options in local privacy mode (their own secret), else
    None."""
    from fedlora.core.privacy import LocalDP

    ledger = fed.ledger
    if ledger is None or ledger.mode != "local":
        return None
    return LocalDP(ledger.clip_norm, ledger.noise_multiplier, fed.clients.secret, ledger.seeded)


def reply(fed: Any, rnd: int, spec: Any, payload: Any, train, on_update) -> rounds.Reply:
    """The client's `rounds.Reply`: ``train()``'s update (``on_update`` may replace it: fault
    injection), or the error it raised (``robust.fatal_drops``: an unexpected error stops the
    run, with its traceback)."""
    try:
        update = train()
        if on_update is not None:
            replaced = on_update(rnd, spec, update)
            update = replaced if isinstance(replaced, ClientUpdate) else update
        return rounds.Reply(spec, payload, update)
    except Exception as e:  # noqa: BLE001 - a failing client is dropped, not the run
        if fed.server.fatal_drops and not isinstance(e, FedLoraError):
            raise
        LOG.debug("round %d: client %s failed", rnd, spec.client_id, exc_info=True)
        reason = str(e) if isinstance(e, FedLoraError) else f"{type(e).__name__}: {e}"
        return rounds.Reply(spec, payload, None, reason)


def train_clients(
    fed: Any, rnd: int, chosen: Sequence[int], tally: rounds.RoundTally, on_update, cbar
) -> Iterator[rounds.Reply]:
    """Step 2: each chosen client configured (`rounds.configure`) and trained when the round's
    close asks for its reply, in groups of `parallel_width`."""
    width, privacy = parallel_width(fed), local_dp(fed)
    for start in range(0, len(chosen), width):
        tc = time.perf_counter()
        ready = []
        for c in chosen[start : start + width]:
            payload = rounds.configure(fed.server, rnd, fed.specs[c], tally)
            if payload is not None:
                ready.append((c, fed.specs[c], payload))
        results = _together(fed, rnd, ready, privacy) if len(ready) > 1 else None
        tally.t_train += time.perf_counter() - tc
        for i, (c, spec, payload) in enumerate(ready):
            tc = time.perf_counter()

            def train(i=i, c=c, payload=payload, results=results):
                if results is None:  # one by one (a group that cannot batch logged why)
                    return fed.clients.train(c, payload, rnd, privacy)
                if isinstance(results[i], Exception):
                    raise results[i]
                return results[i]

            answer = reply(fed, rnd, spec, payload, train, on_update)
            tally.t_train += time.perf_counter() - tc
            if cbar is not None:
                cbar.update(1)
            yield answer


def _together(fed: Any, rnd: int, ready: list, privacy) -> list | None:
    from fedlora.clients.parallel import train_clients_together

    items = [(spec, payload, fed.clients.client_data(c)) for c, spec, payload in ready]
    c = fed.clients
    return train_clients_together(
        c.host, items, c.train_cfg, c.tokenizer, server_round=rnd, privacy=privacy
    )
