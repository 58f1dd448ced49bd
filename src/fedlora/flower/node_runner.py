"""A ClientApp process that lives as long as its SuperNode: the model is built once per run.

Under Flower 1.41's default ``--isolation subprocess`` a SuperNode's SuperExec starts a fresh
``flwr-clientapp`` process for every message, which exits after one reply: the model is built
again for every message. With ``flower-supernode --isolation process`` the SuperNode only
serves its Runtime API (``--host``/``--port``) and leaves running ClientApps to an outside
process. This module is that process: it polls the SuperNode for ClientApp tasks and runs each
one in this process (Flower's own task steps: pull the message and context, call the
ClientApp, push the reply and the updated context), so `fedlora.flower.backend`'s per-process
cache keeps the model between rounds.

    flower-supernode --insecure --isolation process --superlink 127.0.0.1:9092 \\
        --host 127.0.0.1 --port 9094 --node-config "partition-id=0"
    python -m fedlora.flower.node_runner --runtime-api-address 127.0.0.1:9094 --insecure

Tasks run one at a time (a node trains one client). A task that raises is answered with a
Flower error reply, as ``flwr-clientapp`` does, and the runner goes on with the next task.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from flwr.app import Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp import ClientApp
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

LOG = logging.getLogger("fedlora.flower")


class NodeRunner:
    """Runs the ClientApp tasks of one SuperNode (``--isolation process``) in this process."""

    def __init__(
        self, runtime_api_address: str, insecure: bool, root_certificates: bytes | None = None
    ) -> None:
        self.address = runtime_api_address
        self.insecure = insecure
        self.root_certificates = root_certificates
        self.apps: dict[str, ClientApp] = {}  # FAB hash -> its loaded ClientApp
        self.tasks = 0

    def _client(self, *interceptors) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.insecure,
            root_certificates=self.root_certificates,
            interceptors=list(interceptors),
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def _app(self, run, fab) -> ClientApp:
        """The run's ClientApp, installed from its FAB and loaded once per FAB."""
        if fab.hash_str not in self.apps:
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return self.apps[fab.hash_str]

    def run_task(self, token: str) -> None:
        """One ClientApp task: pull its message and context, reply, push the new context."""
        client = self._client(
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, run, fab = pull_task_input(client)
            reply = self._app(run, fab)(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - answered with an error reply, as flwr-clientapp
            LOG.exception("fedlora: ClientApp task failed")
            details = f"{type(ex)}:<'{ex}'>"
            if message is not None:
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                    reply_to=message,
                )
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, status, details)
            finally:
                heartbeat.stop()
                client.close()
                self.tasks += 1
                kind = message.metadata.message_type if message is not None else "?"
                LOG.info("fedlora: node runner: task %d (%s) %s", self.tasks, kind, status)

    def serve(self, poll_interval: float = 0.2, max_tasks: int | None = None) -> None:
        """Poll the SuperNode for ClientApp tasks and run them until stopped."""
        acquire = self._client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        try:
            while max_tasks is None or self.tasks < max_tasks:
                res = acquire.AcquireTask(request)
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                else:
                    time.sleep(poll_interval)
        finally:
            acquire.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fedlora.flower.node_runner",
        description="Run a SuperNode's ClientApp tasks in one long-lived process "
        "(flower-supernode --isolation process): the model is built once per run.",
    )
    parser.add_argument(
        "--runtime-api-address", required=True, help="the SuperNode's --host:--port"
    )
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="plain HTTP (loopback only)")
    tls.add_argument("--root-certificates", help="CA of the SuperNode's Runtime API certificate")
    parser.add_argument("--poll-interval", type=float, default=0.2, help="seconds between polls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API call
    certs = Path(args.root_certificates).read_bytes() if args.root_certificates else None
    try:
        NodeRunner(args.runtime_api_address, args.insecure, certs).serve(args.poll_interval)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
