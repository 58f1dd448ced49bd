"""The in-process engine's side of ``train.parallel_clients``: a round's clients trained in
groups (`fedlora.parallel.train_clients_together`), and their data tokenized once per run.

`train_grouped` replaces the one-by-one loop of `fedlora.engine.runner.train_clients` when the
width is above 1: it configures a group's payloads, trains the group, and streams the updates
out in client order through the same checks (`finish_one`) and drop handling (`guarded`), so
a streaming aggregation holds at most one group's updates. A group that cannot be batched
(local DP-SGD, ``train.compile``, ...) trains one by one, with a log line.

`tokenized` is what `Federation.client_data` caches: a client's examples as model inputs
(token ids and labels as Python int lists), about 50 bytes per token (measured: 0.84 MB for
``lora_a2_paper``'s 506 training examples, 16k tokens; 0.11 MB for ``tiny``'s 96), so rounds
after the first skip tokenization.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fedlora.contract import payload_nbytes

LOG = logging.getLogger("fedlora.engine")

#: "auto" never groups more clients than this (the benchmark's largest measured group)
MAX_AUTO_WIDTH = 16


def tokenized(fed: Any, c: int) -> list[dict[str, Any]]:
    """Client `c`'s training examples as model inputs (`fedlora.client._features` for a causal
    LM, `fedlora.data.encode_classification` for a classifier)."""
    from fedlora.client import _features
    from fedlora.data import encode_classification

    ex = [fed.examples[i] for i in fed.split.train[c]]
    max_length = fed.cfg.train.max_length
    if fed.label_to_id is None:
        return _features(ex, fed.tokenizer, max_length, f"client {fed.specs[c].client_id}")
    return [
        encode_classification(fed.tokenizer, e, fed.label_to_id, max_length)
        for e in ex
        if e.label is not None
    ]


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
        t = fed.cfg.train
        w = auto_width(fed.host.model, fed.host.device, t.batch_size, t.max_length)
        LOG.info("train.parallel_clients = 'auto': %d clients per group on %s", w, fed.host.device)
        fed.auto_parallel_width = w
    return w


def train_grouped(
    fed: Any, rnd: int, chosen: Sequence[int], tally: Any, on_update, cbar, width: int
) -> Iterator[tuple[Any, Any]]:
    """`fedlora.engine.runner.train_clients` for groups of `width` clients."""
    from fedlora.client import train_client
    from fedlora.engine.runner import finish_one, guarded
    from fedlora.parallel import train_clients_together

    for start in range(0, len(chosen), width):
        tc = time.perf_counter()
        ready = []
        for c in chosen[start : start + width]:
            spec = fed.specs[c]
            got = guarded(fed, rnd, spec, tally, lambda c=c: _configure(fed, rnd, c, tally))
            if got is not None:
                ready.append((spec, *got))
            elif cbar is not None:
                cbar.update(1)
        results = None
        if len(ready) > 1:
            results = train_clients_together(
                fed.host,
                ready,
                fed.train_cfg,
                fed.tokenizer,
                server_round=rnd,
                privacy=fed.local_dp,
            )
        tally.t_train += time.perf_counter() - tc
        for i, (spec, payload, data) in enumerate(ready):
            tc = time.perf_counter()

            def work(i=i, spec=spec, payload=payload, data=data, results=results):
                if results is None:  # one by one (logged by train_clients_together)
                    update = train_client(
                        fed.host,
                        spec,
                        payload,
                        data,
                        fed.train_cfg,
                        fed.tokenizer,
                        server_round=rnd,
                        privacy=fed.local_dp,
                    )
                elif isinstance(results[i], Exception):
                    raise results[i]
                else:
                    update = results[i]
                return finish_one(fed, rnd, spec, payload, update, tally, on_update)

            item = guarded(fed, rnd, spec, tally, work)
            tally.t_train += time.perf_counter() - tc
            if cbar is not None:
                cbar.update(1)
            if item is not None:
                yield item


def _configure(fed: Any, rnd: int, c: int, tally: Any) -> tuple[Any, list[Any]]:
    payload = fed.strategy.configure(fed.specs[c], rnd)
    tally.down += payload_nbytes(payload)
    return payload, fed.client_data(c)
