"""The researcher's ClientApp: their model and data, fedlora's client training."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.clients.host import LoraHost
from fedlora.clients.train import TrainConfig
from fedlora.flower.user_app import hello_reply, train_reply
from user_app.task import TARGETS, build_model, load_partition

app = ClientApp()
_HOST: list[LoraHost] = []  # one model per process (a simulation actor serves many messages)


def host() -> LoraHost:
    if not _HOST:
        _HOST.append(LoraHost(build_model(), TARGETS))
    return _HOST[0]


def my_rank(context: Context) -> int:
    ranks = [int(r) for r in str(context.run_config["rank-by-partition"]).split(",")]
    return ranks[int(context.node_config["partition-id"]) % len(ranks)]


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    return hello_reply(msg, context, rank=my_rank(context), client_id=f"site-{pid}")


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    cfg = TrainConfig(
        local_steps=int(context.run_config["local-steps"]),
        lr=float(context.run_config["lr"]),
        batch_size=4,
        device="cpu",
    )
    return train_reply(msg, context, host(), load_partition(pid), cfg)
