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


def check_home(home: Path) -> Path:
    """`home` as a Flower home (``FLWR_HOME``): absolute, and not inside a Flower app folder
    (one whose ``pyproject.toml`` has ``[tool.flwr.app]``): Flower installs the apps it runs
    under its home, so a home inside the app it packages nests every earlier run's copy one
    level deeper, until "exceeds the maximum directory depth of 10" (issue 27)."""
    home = Path(home)
    if not home.is_absolute():
        raise ValueError(f"FLWR_HOME {home}: must be an absolute path")
    for parent in home.resolve().parents:
        project = parent / "pyproject.toml"
        try:
            if "[tool.flwr.app" in project.read_text(errors="replace"):
                raise ValueError(
                    f"FLWR_HOME {home} is inside the Flower app {parent}: Flower would package "
                    "its own installs into every later run; use a folder outside the app"
                )
        except OSError:
            continue
    return home


def simulation_env(
    home: Path, port: int, control_port: int, ray_address: str = "local"
) -> dict[str, str]:
    """Environment for ``flwr run ... local-simulation`` against `simulation_superlink` (and
    for that SuperLink: its runs' ``flwr-simulation`` calls ``ray.init()``, which joins the
    cluster at ``RAY_ADDRESS``; ``"local"``: a new one-machine cluster per run). ``PATH``
    starts with this Python's scripts folder: the SuperLink starts ``flower-superexec`` (and
    it ``flwr-serverapp`` ...) by name, which failed from a virtual environment that was not
    activated."""
    check_home(home)
    return {
        **os.environ,
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        # "0": Ray's local cluster on 127.0.0.1; "1" (joining a cluster): Ray takes this
        # machine's address as seen towards the cluster's (127.0.0.1 for a loopback cluster);
        # "0" would refuse a multi-node cluster
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0" if ray_address == "local" else "1",
        # by default a new local Ray cluster per run, never one started with `ray start` on
        # this machine; else the cluster (`ray_cluster`'s address) that the runs join
        "RAY_ADDRESS": ray_address,
    }


def simulation_superlink(
    home: Path,
    log: IO,
    timeout: float = 60.0,
    extra: Sequence[str] = (),
    ray_address: str = "local",
):
    """Start a local simulation SuperLink (what ``flwr`` starts for ``":local:"``) on free
    loopback ports, with `extra` arguments, its runs on the Ray cluster `ray_address`
    (``"local"``: a new one per run); ``(process, env)`` with the environment for ``flwr
    run``."""
    import httpx

    port, control = free_port(), free_port()
    env = simulation_env(home, port, control, ray_address)
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


def ray_cluster(
    temp_dir: Path, log: IO, cpus: Sequence[int] = (1, 1), timeout: float = 120.0
) -> tuple[str, list[subprocess.Popen]]:
    """A Ray cluster of ``len(cpus)`` nodes on 127.0.0.1 (a head and workers, each a
    ``ray start --block`` process with its own CPUs, as on separate machines); ``(address,
    processes)``. Stop it with `stop` (each ``ray start --block`` takes its node's daemons
    with it); never ``ray stop``, which ends every Ray cluster on the machine.

    `temp_dir` must be short (Ray's socket paths are limited to 107 characters)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # "1": multi-node allowed (else Ray refuses a second node); the nodes bind 127.0.0.1
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # --temp-dir on every node: Ray's sessions and its address file stay there, not in /tmp/ray
    common = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    common += ["--temp-dir", str(temp_dir)]
    procs = [
        start(
            [
                exe("ray"),
                "start",
                "--head",
                "--port",
                str(port),
                "--num-cpus",
                str(cpus[0]),
                "--include-dashboard=false",
                *common,
            ],
            env,
            log,
        )  # fmt: skip
    ]
    try:
        _wait_for_ray(address, 1, procs, timeout, env)
        for n in cpus[1:]:
            procs.append(
                start(
                    [exe("ray"), "start", "--address", address, "--num-cpus", str(n), *common],
                    env,
                    log,
                )  # fmt: skip
            )
        _wait_for_ray(address, len(cpus), procs, timeout, env)
    except BaseException:
        stop(procs)
        raise
    return address, procs


def ray_nodes(address: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The ids of the live nodes of the Ray cluster at `address` (asked in a child process, so
    this process never becomes a Ray driver); [] if it does not answer."""
    code = (
        "import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
        "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))"
    )
    env = dict(env or {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})
    got = subprocess.run(
        [sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120, env=env
    )
    lines = got.stdout.strip().splitlines()
    return lines[-1].split() if got.returncode == 0 and lines else []


def _wait_for_ray(
    address: str, nodes: int, procs: list, timeout: float, env: Mapping[str, str]
) -> None:
    """Wait until the cluster at `address` has `nodes` live nodes."""
    deadline = time.monotonic() + timeout
    while True:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a `ray start` process exited; see its log")
        if len(ray_nodes(address, env)) == nodes:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray cluster at {address} does not have {nodes} nodes")
        time.sleep(1)
