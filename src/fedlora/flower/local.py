"""Flower processes on this machine (127.0.0.1) for scripts and tests.

Every process is started in its own session (a process group) and stopped by its PID's group,
so the children it starts (``flower-superexec``, ``flwr-simulation``, Ray's daemons) go with
it. `simulation_superlink` starts the local simulation SuperLink that ``flwr run <app>
local-simulation`` (connection address ``":local:"``) would otherwise start detached, on free
loopback ports that ``flwr`` is pointed at (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``,
``FLWR_LOCAL_CONTROL_API_PORT``), so the caller owns it and can stop it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

BIN = Path(sys.executable).parent


def exe(name: str) -> str:
    """A console script of this Python environment (``flwr``, ``flower-superlink``, ...)."""
    path = BIN / name
    return str(path) if path.exists() else name


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: Mapping[str, str], log: IO) -> subprocess.Popen:
    """Start `cmd` in its own session, its output to `log`."""
    return subprocess.Popen(
        cmd, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(procs: list[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    """Signal each process's group (children included), SIGKILL what is left after 15 s."""
    for p in reversed(procs):
        try:  # the group of a process we started (also if its leader has exited: a refused
            os.killpg(p.pid, sig)  # SuperNode's children may be left)
        except ProcessLookupError:
            pass
    for p in reversed(procs):
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)


def simulation_env(home: Path, port: int, control_port: int) -> dict[str, str]:
    """Environment for ``flwr run ... local-simulation`` against `simulation_superlink`."""
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's local cluster on 127.0.0.1
        # a new local Ray cluster per run, never one started with `ray start` on this machine
        "RAY_ADDRESS": "local",
    }


def simulation_superlink(home: Path, log: IO, timeout: float = 60.0, extra: Sequence[str] = ()):
    """Start a local simulation SuperLink (what ``flwr`` starts for ``":local:"``) on free
    loopback ports, with `extra` arguments; ``(process, env)`` with the environment for
    ``flwr run``."""
    import httpx

    port, control = free_port(), free_port()
    env = simulation_env(home, port, control)
    proc = start(
        [exe("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--control-api-address", f"127.0.0.1:{control}", "--host", "127.0.0.1",
         "--port", str(port), "--database", str(home / "local-superlink.db"), *extra],
        env, log,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                return proc, env
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop([proc])
            raise RuntimeError("the local simulation SuperLink did not start; see its log")
        time.sleep(0.5)
