"""Starting and stopping Flower processes in tests: every process in its own session (process
group), on 127.0.0.1, stopped by its PID's group, also after its leader has exited."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def exe(name: str) -> str:
    """A console script of this Python environment (``flwr``, ``flower-superlink``, ...)."""
    path = BIN / name
    return str(path) if path.exists() else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process's group (children included), SIGKILL what is left after 15 s."""
    for p in reversed(procs):
        try:  # the group of a process this test started (also if its leader has exited: a
            os.killpg(p.pid, signal.SIGTERM)  # refused SuperNode's children may be left)
        except ProcessLookupError:
            pass
    for p in reversed(procs):
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)
