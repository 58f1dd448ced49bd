"""`FlowerStrategy`: any fedlora `Strategy` as a Flower (Message API) strategy.

Per round:

1. ``configure_train`` learns the specs of nodes it has not seen (one cheap ``query.hello``
   message: the node answers with its declared ``--node-config``, see `fedlora.flower.nodes`),
   then builds one `Payload` per node with ``strategy.configure(spec, round)`` and sends it with
   the resolved spec. A node whose declaration is invalid is logged and skipped.
2. ``aggregate_train`` decodes each reply and checks it on its own (error reply, undecodable,
   then `fedlora.core.contract.check_update`: wrong client, NaN/Inf, wrong shapes or ranks, LoRA-A2
   slots), then bounds the contribution norms (`fedlora.core.robust.screen_updates`, as the
   in-process engine does) before anything is aggregated; a bad reply is dropped with its
   reason logged, the rest go to ``strategy.aggregate``. The returned metrics say how many
   replies were used.

Clients are stateless: every payload carries what the node needs (merge, adapter, seed), so a
node that missed rounds trains from the current global model.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlwrStrategy

from fedlora.core.contract import (
    ClientSpec,
    ClientUpdate,
    FedLoraError,
    Payload,
    Strategy,
)
from fedlora.core.robust import NormBound, WeightBound
from fedlora.federation import rounds
from fedlora.federation.config import RobustConfig
from fedlora.flower import codec
from fedlora.flower.nodes import resolve_spec

HELLO = "query.hello"
SUPERLINK_NODE_ID = 1  # the source of the error replies the SuperLink writes for a node
#: how much of a node's free text (an error reason, a place's value) reaches the result files
MAX_TEXT = 500


class FlowerStrategy(FlwrStrategy):
    """Drive a fedlora `Strategy` over a Flower `Grid`.

    ``shapes`` (module -> (d_out, d_in)) is the model's module list: node ranks are validated
    against it and updates are checked against it. ``specs`` may pre-register node specs
    (node id -> `ClientSpec`), skipping the hello for those nodes. ``client_specs``
    (partition id -> `ClientSpec`, from an experiment config) gives each node the configured
    client of its ``partition-id`` (see `fedlora.flower.nodes.resolve_spec`).

    Sampling: with ``clients_per_round`` k, each round draws k of the ready nodes, ordered by
    client id, with ``numpy.random.default_rng([sample_seed, 7])`` and
    `fedlora.federation.rounds.sample`, exactly as the in-process engine draws its clients:
    when the nodes are the experiment's training clients, a Flower run trains the same clients
    each round as ``fedlora run``. Fewer ready nodes than k: all
    of them train. Without it, ``fraction_train`` of the nodes (all when 1.0).
    """

    def __init__(
        self,
        strategy: Strategy,
        shapes: Mapping[str, tuple[int, int]],
        *,
        fraction_train: float = 1.0,
        min_nodes: int = 1,
        fraction_evaluate: float = 0.0,
        rank_types: Sequence[int] = (),
        default_rank: int | None = None,
        default_alpha: float = 16.0,
        hello_timeout: float = 120.0,
        wait_timeout: float = 120.0,
        specs: Mapping[int, ClientSpec] | None = None,
        sample_seed: int = 0,
        client_specs: Mapping[int, ClientSpec] | None = None,
        clients_per_round: int | None = None,
        norm_bound: NormBound | None = None,
        server: rounds.Server | None = None,
    ) -> None:
        self.shapes = {m: (int(s[0]), int(s[1])) for m, s in shapes.items()}
        # the federation's server side (`fedlora.federation.build.build_server`), or `strategy`
        # with the engine's default bounds (`RobustConfig`) unless told otherwise
        # the weight bound: the configured clients' counts are the server's (a node's
        # declared or reported count never raises its weight above them)
        known = {s.client_id: s.num_examples for s in (client_specs or {}).values()}
        self.server = server or rounds.Server(
            strategy,
            norm_bound if norm_bound is not None else RobustConfig().bound(),
            WeightBound(RobustConfig().max_weight_ratio, {c: n for c, n in known.items() if n}),
        )
        self.server.shapes = self.shapes
        self.fraction_train = fraction_train
        self.min_nodes = min_nodes
        self.fraction_evaluate = fraction_evaluate
        self.rank_types = list(rank_types)
        self.default_rank = default_rank
        self.default_alpha = default_alpha
        self.hello_timeout = hello_timeout
        self.wait_timeout = wait_timeout
        self.specs: dict[int, ClientSpec] = dict(specs or {})
        self.rejected: dict[int, str] = {}  # node id -> why its declaration was refused
        self.sample_seed = sample_seed
        self.client_specs = None if client_specs is None else dict(client_specs)
        self.clients_per_round = clients_per_round
        self.sampler = rounds.make_sampler(sample_seed, self.server.ledger)
        self._sent: dict[int, tuple[ClientSpec, Payload, int]] = {}  # node -> spec, payload, bytes
        self._messages: dict[int, Message] = {}  # node -> the train message sent to it this round
        self._tally = rounds.RoundTally()
        self.totals = rounds.new_totals()
        self._round_start = self._configured_at = time.perf_counter()
        self.rounds: list[dict[str, Any]] = []  # one record per train round (for result files)
        self.eval_rounds: list[dict[str, Any]] = []
        # set by `fedlora.flower.server_app.build`: rounds to run, where to write results, the
        # experiment configuration
        self.num_rounds: int = 1
        self.result_dir: str = ""
        self.experiment: Any = None
        # node id -> node config, for nodes whose config the runtime knows (set by
        # `fedlora.flower.server_app.main` in Flower's simulation runtime); None: ask every node
        self.node_configs: Callable[[], Mapping[int, Mapping[str, Any]]] | None = None
        # rounds done before this `start` (a resumed ServerApp: Flower counts from 1 again),
        # and what runs after each round's aggregation (the result folder's checkpoint)
        self.round_offset = 0
        self.on_round_end: Callable[[int], None] | None = None
        self._eval_messages: dict[int, Message] = {}

    @property
    def strategy(self) -> Strategy:
        return self.server.strategy

    @property
    def privacy(self) -> Any:
        """The run's privacy accounting (`fedlora.core.privacy.PrivacyLedger`), None without
        DP."""
        return self.server.ledger

    # -- node identity --------------------------------------------------------------------

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.wait_timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.min_nodes or time.monotonic() > deadline:
                return nodes
            log(INFO, "fedlora: waiting for nodes: %d of %d", len(nodes), self.min_nodes)
            time.sleep(1)

    def learn(self, node_id: int, declared: Mapping[str, Any]) -> ClientSpec | None:
        """Resolve and remember a node's declared spec; log and refuse an invalid one."""
        try:
            spec = resolve_spec(
                declared,
                node_id,
                self.shapes,
                rank_types=self.rank_types,
                default_rank=self.default_rank,
                default_alpha=self.default_alpha,
                configured=self.client_specs,
            )
            for other, s in self.specs.items():
                if other != node_id and s.client_id == spec.client_id:
                    raise FedLoraError(
                        f"node {node_id}: client id {spec.client_id!r} is already used by node "
                        f"{other}; give each node its own partition-id or client-id"
                    )
        except Exception as e:  # noqa: BLE001 - a node's declaration never crashes the server
            e = e if isinstance(e, FedLoraError) else FedLoraError(f"node {node_id}: {e!r}")
            if self.rejected.get(node_id) != str(e):
                log(WARNING, "fedlora: node %s skipped: %s", node_id, e)
            self.rejected[node_id] = str(e)
            self.specs.pop(node_id, None)
            return None
        old = self.specs.get(node_id)
        if old != spec:
            log(
                INFO,
                "fedlora: node %s is client %s, ranks %s",
                node_id,
                spec.client_id,
                _ranks_summary(spec),
            )
        self.specs[node_id] = spec
        self.rejected.pop(node_id, None)
        return spec

    def hello(self, grid: Grid, node_ids: Iterable[int], server_round: int) -> None:
        """Ask nodes for their declared config (one small query message each)."""
        node_ids = list(node_ids)
        if not node_ids:
            return
        msgs = [
            Message(
                RecordDict({"config": ConfigRecord({"server-round": server_round})}),
                dst_node_id=n,
                message_type=HELLO,
                group_id=f"hello-{server_round}",
            )
            for n in node_ids
        ]
        replies = list(grid.send_and_receive(msgs, timeout=self.hello_timeout))
        sent = {m.metadata.dst_node_id: m for m in msgs}
        answered = set()
        for msg in replies:
            node = self.reply_node(msg, sent)
            if node is None or node in answered:
                log(WARNING, "fedlora: a hello reply that answers no hello of this round ignored")
                continue
            answered.add(node)
            if msg.has_error():
                reason = _text(msg.error.reason)
                self.rejected[node] = f"hello failed: {reason}"
                log(WARNING, "fedlora: node %s hello failed: %s", node, reason)
                continue
            declared = msg.content.config_records.get(codec.NODE)
            self.learn(node, dict(declared or {}))
        for node in set(node_ids) - answered:
            log(WARNING, "fedlora: node %s did not answer hello (timeout); skipped", node)

    # -- training -------------------------------------------------------------------------

    def summary(self) -> None:
        log(INFO, "\t├──> fedlora strategy: %s", self.strategy.name)
        log(INFO, "\t├──> modules: %d", len(self.shapes))
        log(INFO, "\t└──> fraction_train %.2f, min_nodes %d", self.fraction_train, self.min_nodes)

    def _sample(self, nodes: list[int], fraction: float, server_round: int) -> list[int]:
        if fraction >= 1.0:
            return nodes
        k = max(self.min_nodes, int(round(len(nodes) * fraction)))
        return sorted(
            random.Random(self.sample_seed * 1000003 + server_round).sample(
                nodes, min(k, len(nodes))
            )
        )

    def _sample_clients(self, nodes: list[int], server_round: int) -> list[int]:
        """``clients_per_round`` of `nodes`, drawn as the in-process engine draws clients."""
        k = int(self.clients_per_round or 0)
        ordered = sorted(nodes, key=lambda n: _natural(self.specs[n].client_id))
        if len(ordered) < k and self.server.sampling != "poisson":
            log(
                WARNING,
                "fedlora: round %s: %d nodes ready, fewer than clients_per_round = %d; "
                "all of them train",
                server_round,
                len(ordered),
                k,
            )
        # the rate is k of the nodes actually ready (the accountant's q)
        return rounds.draw(self.server, self.sampler, ordered, k, self._tally)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self._round_start = time.perf_counter()
        nodes = self._wait_for_nodes(grid)
        new = {n for n in nodes if n not in self.specs and n not in self.rejected}
        if new and self.node_configs is not None:  # configs the runtime knows: no hello
            for node, declared in self.node_configs().items():
                if node in new:
                    self.learn(node, declared)
        self.hello(
            grid, [n for n in nodes if n not in self.specs and n not in self.rejected], server_round
        )
        ready = [n for n in nodes if n in self.specs]
        self._tally = rounds.RoundTally()
        if self.clients_per_round:
            chosen = self._sample_clients(ready, server_round)
        else:
            chosen = self._sample(ready, self.fraction_train, server_round)
        self._sent = {}
        self._messages = {}
        messages = []
        self.strategy.begin_round(server_round)
        for node in chosen:
            spec = self.specs[node]
            payload = rounds.configure(self.server, server_round, spec, self._tally)
            if payload is None:  # dropped, with the reason, by the federation core
                continue
            content = codec.encode_payload(payload)
            content[codec.SPEC] = codec.encode_spec(spec)
            content["config"] = ConfigRecord({**dict(config), "server-round": server_round})
            self._sent[node] = (spec, payload, codec.record_nbytes(content))
            msg = Message(
                content, dst_node_id=node, message_type="train", group_id=str(server_round)
            )
            self._messages[node] = msg
            messages.append(msg)
        log(
            INFO,
            "fedlora: round %s: training on %d of %d nodes",
            server_round,
            len(messages),
            len(nodes),
        )
        self._configured_at = time.perf_counter()
        return messages

    def reply_node(self, msg: Message, sent: Mapping[int, Message] | None = None) -> int | None:
        """The node a reply answers: the destination of the message it replies to (among
        `sent`, node -> message; default: this round's train messages); None when it answers
        none of them (a reply to an earlier round's message replayed, an id that matches
        nothing, or a reply sent by another node than the one addressed): it is ignored.

        Matched by ``reply_to_message_id`` (the Grid gives each sent message its id), never
        by the sender alone (issue 27: a round-1 reply replayed in round 2 was taken as the
        node's round-2 answer). An error reply that the SuperLink writes for a node that went
        offline comes from the SuperLink (``src_node_id`` 1), not from the node. Only a Grid
        that assigns no message ids at all (a test double) is matched by the reply's source.
        """
        sent = self._messages if sent is None else sent
        to = msg.metadata.reply_to_message_id
        src = msg.metadata.src_node_id
        if not to:
            return src if not any(m.metadata.message_id for m in sent.values()) else None
        for node, out in sent.items():
            if out.metadata.message_id == to:
                return node if src in (node, SUPERLINK_NODE_ID) else None
        return None

    def check_reply(self, server_round: int, msg: Message) -> ClientUpdate:
        """Decode one reply; raise FedLoraError with the reason (an error reply, undecodable,
        another client's). Its checks against the payload are the federation core's."""
        node = self.reply_node(msg)
        if node is None or node not in self._sent:
            raise FedLoraError(f"reply from node {node}, which was not sent a payload")
        if msg.has_error():
            raise FedLoraError(f"error reply: {_text(msg.error.reason)}")
        spec = self._sent[node][0]
        declared = msg.content.config_records.get(codec.NODE)
        if declared is not None:  # the node's declaration may change; used from next round
            self.learn(node, dict(declared))
        try:
            u = codec.decode_update(msg.content)
        except Exception as e:  # noqa: BLE001 - a node's reply never crashes the server
            raise FedLoraError(f"undecodable reply: {type(e).__name__}: {e}") from None
        if u.client_id != spec.client_id:
            raise FedLoraError(f"reply claims client {u.client_id!r}, expected {spec.client_id!r}")
        return u

    def _replies(self, server_round: int, replies: Iterable[Message]):
        """This round's `rounds.Reply` per node sent a payload (in the order sent: by client
        id), the decoded updates and their messages; replies from nodes not sent a payload,
        or a node's second reply, are ignored with the reason."""
        got: dict[int, Message] = {}
        ignored: dict[str, str] = {}
        for msg in replies:
            node = self.reply_node(msg)
            why = (
                "answers no message of this round (replayed, or its id matches none)"
                if node is None
                else "not sent a payload this round" if node not in self._sent
                else "second reply in one round" if node in got else None
            )  # fmt: skip
            if why is None:
                got[node] = msg
                continue
            src = msg.metadata.src_node_id if node is None else node
            ignored[f"node-{src}"] = why
            log(WARNING, "fedlora: round %s: reply of node %s ignored: %s", server_round, src, why)
        out: list[rounds.Reply] = []
        decoded: dict[str, tuple[ClientUpdate, Message]] = {}
        for node, (spec, payload, _) in self._sent.items():
            msg = got.get(node)
            if msg is None:
                out.append(rounds.Reply(spec, payload, None, "no reply (failed or timed out)"))
                continue
            try:
                u = self.check_reply(server_round, msg)
            except Exception as e:  # noqa: BLE001 - one reply never crashes the server
                why = str(e) if isinstance(e, FedLoraError) else f"{type(e).__name__}: {e}"
                out.append(rounds.Reply(spec, payload, None, why))
                continue
            decoded[spec.client_id] = (u, msg)
            out.append(rounds.Reply(spec, payload, u))
        return out, decoded, ignored, len(got)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        received_at = time.perf_counter()
        answers, decoded, ignored, received = self._replies(server_round, replies)
        tally = self._tally
        row = rounds.close_round(self.server, server_round, answers, tally, self.totals)
        used = [decoded[c][0] for c in tally.used]
        metrics = MetricRecord(
            {
                "replies-sent": len(self._sent),
                "replies-received": received,
                "replies-used": row["used"],
                "replies-dropped": len(row["dropped"]),
                "download-bytes": sum(b for _, _, b in self._sent.values()),
                "download-payload-nbytes": row["bytes_down"],
                "upload-bytes": sum(codec.record_nbytes(m.content) for _, m in decoded.values()),
                "upload-trained-nbytes": row["bytes_up"],
            }
        )
        if "epsilon" in row:
            metrics["epsilon"] = row["epsilon"]
        weight = tally.weights  # the counts as the server bounded them
        # under a privacy mode the clients' extras (losses, times) are not covered: no means
        private = self.server.ledger is not None
        keys = {k for u in used for k, v in u.extras.items() if isinstance(v, float)}
        keys = set() if private else keys
        for k in sorted(keys):
            vals = [
                (weight[u.client_id], u.extras[k])
                for u in used
                if isinstance(u.extras.get(k), float)
            ]
            metrics[k] = sum(n * v for n, v in vals) / max(1, sum(n for n, _ in vals))
        self.rounds.append(
            {
                **row,
                "sent": [s.client_id for s, _, _ in self._sent.values()],
                "used_clients": list(tally.used),
                "ignored": ignored,
                "num_examples": sum(weight.values()),
                "metrics": dict(metrics),
                "client_metrics": {c: _client_metrics(u, m) for c, (u, m) in decoded.items()},
                # host, pid and Ray node id of the process that trained each used client
                "client_places": {c: _place(m) for c, (u, m) in decoded.items()},
                # wall time from configure to aggregated, and its parts: configure (incl.
                # waiting for nodes and hellos), send and receive (messaging and the nodes'
                # work), checks and aggregation
                "seconds": time.perf_counter() - self._round_start,
                "configure_seconds": self._configured_at - self._round_start,
                "exchange_seconds": received_at - self._configured_at,
                "aggregate_seconds": time.perf_counter() - received_at,
            }
        )
        if self.on_round_end is not None:
            self.on_round_end(server_round)
        if not row["aggregated"]:
            return None, metrics
        return self.global_arrays(), metrics

    def global_arrays(self) -> ArrayRecord:
        """The global delta (scale-1 factors) as an ArrayRecord: ``A/<module>``, ``B/<module>``."""
        return codec.adapter_to_arrays(self.strategy.global_delta())

    # -- evaluation: the global delta on the nodes' local data ----------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self._eval_messages = {}
        if self.fraction_evaluate <= 0:
            return []
        try:
            delta = self.strategy.global_delta()
        except Exception:  # noqa: BLE001  (no global model yet)
            return []
        nodes = [n for n in sorted(grid.get_node_ids()) if n in self.specs]
        chosen = self._sample(nodes, self.fraction_evaluate, server_round + 7919)
        # the global dense tensors (a classifier head) travel with the delta
        content = codec.encode_payload(self.strategy.with_dense(Payload(delta or None, None)))
        out = []
        for node in chosen:
            c = RecordDict(dict(content))
            c[codec.SPEC] = codec.encode_spec(self.specs[node])
            c["config"] = ConfigRecord({**dict(config), "server-round": server_round})
            msg = Message(c, dst_node_id=node, message_type="evaluate", group_id=str(server_round))
            self._eval_messages[node] = msg
            out.append(msg)
        return out

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.round_offset
        good = []
        dropped = 0
        answered: set[int] = set()
        for msg in replies:
            node = self.reply_node(msg, self._eval_messages)
            if node is None or node in answered:  # a replay, a forged id, a second reply
                dropped += 1
                log(WARNING, "fedlora: round %s: an evaluation reply that answers no "
                    "evaluation message of this round ignored", server_round)  # fmt: skip
                continue
            answered.add(node)
            mr = None if msg.has_error() else msg.content.metric_records.get(codec.METRICS)
            vals = dict(mr or {})
            n = vals.pop("num-examples", 0)
            if (
                mr is None
                or n < 1
                or not all(
                    isinstance(v, (int, float)) and v == v and abs(v) != float("inf")
                    for v in vals.values()
                )
            ):
                dropped += 1
                log(
                    WARNING,
                    "fedlora: round %s: evaluation reply of node %s dropped",
                    server_round,
                    msg.metadata.src_node_id,
                )
                continue
            good.append((n, vals))
        out = MetricRecord({"replies-used": len(good), "replies-dropped": dropped})
        total = sum(n for n, _ in good)
        for k in sorted({k for _, v in good for k in v}):
            pairs = [(n, v[k]) for n, v in good if k in v]
            out[k] = sum(n * x for n, x in pairs) / max(1, sum(n for n, _ in pairs))
        self.eval_rounds.append({"round": server_round, "num_examples": total, **dict(out)})
        return out if good else None


def _client_metrics(u: ClientUpdate, msg: Message) -> dict[str, float]:
    """One used reply's finite float metrics and its node's counters (model builds, load
    seconds): what the node sends beyond that never reaches the result files."""
    out = {k: v for k, v in u.extras.items() if isinstance(k, str) and _finite(v)}
    node = msg.content.metric_records.get(codec.NODE_METRICS)
    out.update({str(k)[:MAX_TEXT]: float(v) for k, v in dict(node or {}).items() if _finite(v)})
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(value: Any) -> str:
    """A node's free text as it may reach a file: a str, at most `MAX_TEXT` characters."""
    return (value if isinstance(value, str) else repr(value))[:MAX_TEXT]


def _place(msg: Message) -> dict[str, Any]:
    """A reply's ``fedlora.node-place`` record (host, pid, Ray node), validated: str keys with
    str, int, finite float or bool values; anything else (bytes, lists: issue 27, bytes broke
    result.json) is left out and named."""
    try:
        raw = dict(msg.content.config_records.get(codec.NODE_PLACE) or {})
    except Exception as e:  # noqa: BLE001 - a node's record never crashes the server
        return {"invalid": _text(f"{type(e).__name__}: {e}")}
    out: dict[str, Any] = {}
    bad = []
    for k, v in raw.items():
        if isinstance(k, str) and (isinstance(v, (str, bool, int)) or _finite(v)):
            out[k[:MAX_TEXT]] = v[:MAX_TEXT] if isinstance(v, str) else v
        else:
            bad.append(_text(k))
    if bad:
        out["invalid"] = f"left out (not a str, number or bool): {', '.join(bad)}"
    return out


def _natural(client_id: str) -> tuple:
    """Sort key: numeric client ids ("2" < "10") before others, which sort as text."""
    return (0, int(client_id), "") if client_id.isdigit() else (1, 0, client_id)


def _ranks_summary(spec: ClientSpec) -> str:
    values = sorted(set(spec.ranks.values()))
    return str(values[0]) if len(values) == 1 else str(dict(spec.ranks))
