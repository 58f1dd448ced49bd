"""A real Flower deployment on 127.0.0.1: one SuperLink, two SuperNodes with different ranks
(declared with --node-config), `flwr run flower_app` with the app's default experiment (the
``tiny`` preset: tiny random Llama) for 2 rounds, 2 clients per round; insecure, with TLS,
and with TLS plus SuperNode authentication (two registered SuperNode keys, a third SuperNode
with an unregistered key that the SuperLink must refuse).

Every process is started in its own session and stopped by its PID (process group) when the
test leaves `_Processes`, also on failure.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from fedlora.flower.local import exe, free_port, start, stop

pytestmark = pytest.mark.flower

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "flower_app"
OVERRIDES = "rounds=2 clients_per_round=2"  # the tiny preset's 6 clients, 2 of them as nodes


def _make_certs(d: Path) -> None:
    """A CA and a server certificate for 127.0.0.1/localhost (cryptography)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def write_key(key, name):
        (d / name).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_key(ca_key, "ca.key")
    write_key(key, "server.key")


def _make_node_keys(d: Path, names: list[str]) -> None:
    """ECDSA P-384 key pairs in OpenSSH format (what `flower-supernode
    --auth-supernode-private-key` and `flwr supernode register` read), like
    `ssh-keygen -t ecdsa -b 384 -N "" -f <name>`: <name> (private) and <name>.pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        (d / name).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
        (d / f"{name}.pub").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
        )


def _register(env: dict, pub: Path, deadline_s: float = 30.0) -> int:
    """`flwr supernode register <pub> test`, retried until the SuperLink answers."""
    t0 = time.monotonic()
    while True:
        r = subprocess.run(
            [exe("flwr"), "supernode", "register", str(pub), "test", "--format", "json"],
            env=env, capture_output=True, text=True, timeout=60, start_new_session=True,
        )  # fmt: skip
        try:  # with --format json, flwr exits 0 also on failure: read "success"
            reply = json.loads(r.stdout)
        except ValueError:
            reply = {}
        if r.returncode == 0 and reply.get("success"):
            return int(reply["node-id"])
        if time.monotonic() - t0 > deadline_s:
            raise AssertionError(f"flwr supernode register failed:\n{r.stdout}{r.stderr}")
        time.sleep(1.0)


def _runner(node_port: int) -> list[str]:
    """`fedlora.flower.node_runner` for a SuperNode started with ``--isolation process``."""
    return [sys.executable, "-m", "fedlora.flower.node_runner",
            "--runtime-api-address", f"127.0.0.1:{node_port}", "--insecure"]  # fmt: skip


def _flwr_home(tmp_path: Path, port: int, conn: str = "insecure = true") -> dict:
    """The environment of a ``flwr`` whose one connection, ``test``, is the SuperLink on
    127.0.0.1:`port` (`conn`: its TLS line)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\n{conn}\n'
    )
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(home)}


class _Processes:
    """The processes a test starts (`fedlora.flower.local.start`), by group, each logging to
    ``<tmp_path>/<name>.log``. On leaving the ``with`` block after a failure every log's tail
    is printed; always, every process still in `groups` is stopped by PID and the logs closed."""

    def __init__(self, tmp_path: Path, env: dict) -> None:
        self.tmp_path, self.env = tmp_path, env
        self.groups: dict[str, list[subprocess.Popen]] = {}
        self.logs: list[tuple[str, IO]] = []

    def start(self, name: str, cmd: list[str], group: str = "all") -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}.log", "w")
        self.logs.append((name, log))
        p = start(cmd, self.env, log)
        self.groups.setdefault(group, []).append(p)
        return p

    def __enter__(self) -> _Processes:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                for name, log in self.logs:
                    log.flush()
                    print(f"--- {name} ---\n" + (self.tmp_path / f"{name}.log").read_text()[-3000:])
        finally:
            stop([p for g in self.groups.values() for p in g])
            for _, log in self.logs:
                log.close()


def _run_federation(
    tmp_path: Path, tls: bool, auth: bool = False, isolation: str = "subprocess"
) -> dict:
    port = free_port()
    link_args = ["--insecure"]
    node_tls = ["--insecure"]
    conn = "insecure = true"
    if tls:
        certs = tmp_path / "certs"
        certs.mkdir()
        _make_certs(certs)
        link_args = [
            "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"),
        ]  # fmt: skip
        node_tls = ["--root-certificates", str(certs / "ca.crt")]
        conn = f'root-certificates = "{certs / "ca.crt"}"'
    keys = tmp_path / "keys"
    if auth:  # SuperNode authentication needs TLS (the SuperLink refuses it with --insecure)
        keys.mkdir()
        _make_node_keys(keys, ["supernode0", "supernode1", "intruder"])
        link_args = [*link_args, "--enable-supernode-auth"]
    env = _flwr_home(tmp_path, port, conn)
    result_dir = tmp_path / "result"
    with _Processes(tmp_path, env) as ps:
        ps.start(
            "superlink",
            [exe("flower-superlink"), *link_args, "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(port)],
        )  # fmt: skip
        nodes = [("supernode0", "partition-id=0 rank=2"), ("supernode1", "partition-id=1 rank=8")]
        if auth:
            # register the two nodes' public keys with the SuperLink (Control API, TLS);
            # the intruder's key is never registered
            registered = {_register(env, keys / f"{name}.pub") for name, _ in nodes}
            nodes.append(("intruder", "partition-id=2 rank=4"))
        for name, node_config in nodes:
            node_auth = ["--auth-supernode-private-key", str(keys / name)] if auth else []
            node_port = free_port()
            node = ps.start(
                name,
                [exe("flower-supernode"), *node_tls, *node_auth,
                 "--superlink", f"127.0.0.1:{port}", "--isolation", isolation,
                 "--host", "127.0.0.1", "--port", str(node_port),
                 "--node-config", node_config],
            )  # fmt: skip
            if isolation == "process":  # the node's long-lived ClientApp process
                ps.start(f"{name}-runner", _runner(node_port))
        run = subprocess.run(
            [exe("flwr"), "run", str(APP), "test", "--stream",
             "--run-config",
             f'overrides="{OVERRIDES}" result-dir="{result_dir}" round-timeout=60'],
            env=env, capture_output=True, text=True, timeout=200, start_new_session=True,
        )  # fmt: skip
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-4000:]
        assert (result_dir / "result.json").exists(), out[-4000:]
        assert (result_dir / "global_delta.pt").exists() and (result_dir / "config.toml").exists()
        result = json.loads((result_dir / "result.json").read_text())
        if auth:
            listed = _check_intruder_refused(env, tmp_path, keys / "intruder.pub", node)
            assert listed == registered and {int(n) for n in result["nodes"]} == registered
        return result


def _check_intruder_refused(
    env: dict, tmp_path: Path, intruder_pub: Path, intruder: subprocess.Popen
) -> set[int]:
    """The SuperNode with the unregistered key was refused at activation and exited; returns
    the node ids the SuperLink knows (`flwr supernode list`)."""
    from cryptography.hazmat.primitives import serialization

    rc = intruder.wait(timeout=30)
    log = (tmp_path / "intruder.log").read_text()
    assert rc != 0 and "Failed to initialize the connection to the SuperLink" in log, log
    assert "[code: 2004] Failed to activate SuperNode" in log, log  # ApiError 2004: refused
    # the SuperLink log names the refused key (its PEM, SubjectPublicKeyInfo)
    pem = (
        serialization.load_ssh_public_key(intruder_pub.read_bytes())
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    link_log = (tmp_path / "superlink.log").read_text()
    refused = [ln for ln in link_log.splitlines() if pem.splitlines()[1] in ln]
    assert refused and all("No SuperNode found with the given public key" in ln for ln in refused)
    r = subprocess.run(
        [exe("flwr"), "supernode", "list", "test", "--format", "json"],
        env=env, capture_output=True, text=True, timeout=60, start_new_session=True,
    )  # fmt: skip
    listed = json.loads(r.stdout)
    assert r.returncode == 0 and listed["success"], r.stdout + r.stderr
    return {int(n["node-id"]) for n in listed["nodes"]}


def _check(result: dict, builds_per_round: bool = False) -> None:
    assert result["experiment"] == "tiny" and result["strategy"] == "flexlora"
    # node ranks as declared (not the preset's), client ids the engine's ("0", "1")
    nodes = {n["client_id"]: set(n["ranks"].values()) for n in result["nodes"].values()}
    assert nodes == {"0": {2}, "1": {8}}
    assert len(result["rounds"]) == 2
    for r in result["rounds"]:
        assert r["used_clients"] == ["0", "1"], r
        assert r["metrics"]["replies-used"] == 2 and r["dropped"] == {}
        assert r["metrics"]["train_loss"] > 0
        # model builds per node in this run (counted in Flower's per-node context.state): a
        # fresh ClientApp process per message builds it every round; a long-lived one once
        builds = {c: m["model-builds"] for c, m in r["client_metrics"].items()}
        assert builds == dict.fromkeys(["0", "1"], r["round"] if builds_per_round else 1), r
    # 14 LoRA modules of the tiny Llama (2 layers x q,k,v,o,gate,up,down), all updated
    fro = result["global_delta_fro"]
    assert len(fro) == 14 and all(v > 0 for v in fro.values())


def test_superlink_two_supernodes_insecure_model_built_once(tmp_path):
    """``--isolation process`` + `fedlora.flower.node_runner`: each node builds its model once
    in the run, not once per message."""
    _check(_run_federation(tmp_path, tls=False, isolation="process"))


def test_superlink_two_supernodes_tls(tmp_path):
    """Default ``--isolation subprocess``: a fresh ClientApp process (and model) per message."""
    pytest.importorskip("cryptography")
    _check(_run_federation(tmp_path, tls=True), builds_per_round=True)


def test_superlink_two_supernodes_tls_supernode_auth(tmp_path):
    pytest.importorskip("cryptography")
    result = _run_federation(tmp_path, tls=True, auth=True)
    # both registered nodes trained in both rounds, the intruder in none
    _check(result, builds_per_round=True)


def _wait_for_line(path: Path, text: str, count: int = 1, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while path.read_text().count(text) < count:
        assert time.monotonic() < deadline, f"{path.name}: no {text!r}\n" + path.read_text()[-3000:]
        time.sleep(0.1)


def test_node_killed_mid_run_fault_report(tmp_path):
    """Node 1 (SuperNode + its ClientApp process) is killed (SIGKILL) right after it sent its
    round-1 reply.

    Round 2 is still sent to it (the SuperLink lists a node until its heartbeats are 2 x 30 s
    late); the SuperLink then answers for it with a "Node Unavailable" error reply, whose
    source is the SuperLink (node 1), not node 1: the reply must be matched to the message it
    answers, so client "1" is dropped with that reason. Round 3 goes to the one live node.
    """
    port = free_port()
    env = _flwr_home(tmp_path, port)
    result_dir = tmp_path / "result"
    with _Processes(tmp_path, env) as ps:
        ps.start("superlink", [exe("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                               "--port", str(port)], "link")  # fmt: skip
        for i, rank in ((0, 2), (1, 8)):
            node_port = free_port()
            ps.start(
                f"supernode{i}",
                [exe("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--isolation", "process", "--host", "127.0.0.1", "--port", str(node_port),
                 "--node-config", f"partition-id={i} rank={rank}"],
                f"node{i}",
            )  # fmt: skip
            ps.start(f"runner{i}", _runner(node_port), f"node{i}")
        for i in (0, 1):  # both nodes connected before the run (min-nodes=1 below)
            _wait_for_line(tmp_path / f"supernode{i}.log", "SuperNode ID:")
        ps.start(
            "flwr-run",
            [exe("flwr"), "run", str(APP), "test", "--stream", "--run-config",
             f'overrides="rounds=3 clients_per_round=2" result-dir="{result_dir}" '
             "round-timeout=100 min-nodes=1"],
            "run",
        )  # fmt: skip
        # node 1 has sent its round-1 reply to the SuperLink (its second reply, after hello):
        # it dies (SIGKILL, no goodbye to the SuperLink, which lists it until its heartbeats
        # are late; a SuperNode stopped with SIGTERM deactivates itself at once, and then the
        # SuperLink answers "Node Unavailable" also for a reply it already holds)
        _wait_for_line(tmp_path / "supernode1.log", "Sent successfully", count=2)
        for p in ps.groups.pop("node1"):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=15)
        (run,) = ps.groups["run"]
        assert run.wait(timeout=400) == 0, (tmp_path / "flwr-run.log").read_text()[-4000:]
        result = json.loads((result_dir / "result.json").read_text())

    rounds = {r["round"]: r for r in result["rounds"]}
    assert sorted(rounds) == [1, 2, 3]
    want = {  # round: (sent, used, replies received)
        1: (["0", "1"], ["0", "1"], 2),
        2: (["0", "1"], ["0"], 2),  # node 1's reply: the SuperLink's error reply
        3: (["0"], ["0"], 1),  # node 1 no longer listed
    }
    for n, (sent, used, received) in want.items():
        r = rounds[n]
        m = r["metrics"]
        assert (r["sent"], r["used_clients"], m["replies-received"]) == (sent, used, received), r
        assert set(r["dropped"]) == set(sent) - set(used), r  # each sent client accounted once
        assert (m["replies-sent"], m["replies-used"], m["replies-dropped"]) == (
            len(sent), len(used), len(sent) - len(used)
        )  # fmt: skip
        assert r["aggregated"]
    assert "Node Unavailable" in rounds[2]["dropped"]["1"], rounds[2]
    # node 0 kept its one model for the whole run
    assert [rounds[n]["client_metrics"]["0"]["model-builds"] for n in (1, 2, 3)] == [1, 1, 1]


# -- issue 27: a hostile node and a killed ServerApp ---------------------------------------


def _serverapp_pids(root: int) -> list[int]:
    """The ``flwr-serverapp`` processes descending from process `root` (the SuperLink: its
    SuperExec, in a session of its own, starts them), by PID."""
    parent, cmd = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                cmd[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError, IndexError):
                continue

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == root:
                return True
        return False

    return [p for p, c in cmd.items() if "flwr-serverapp" in c and descends(p)]


def test_a_hostile_node_and_a_killed_server_app(tmp_path):
    """Issue 27's acceptance: a SuperLink and 3 SuperNodes on 127.0.0.1, one of them hostile
    (`tests/hostile_node.py`: 10**12 examples, a norm escalating x19 a round from 99, a bytes
    node-place record). 4 rounds, 3 clients a round. The ServerApp is SIGKILLed once round 2's
    checkpoint is written; a second ``flwr run`` with ``resume=true`` continues from it. Every
    round finishes with the hostile node's reply dropped, and result.json is whole."""
    port = free_port()
    env = _flwr_home(tmp_path, port)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    result_dir = tmp_path / "result"
    # min-nodes 4 of 3: before each round the ServerApp waits round-timeout for a 4th node, a
    # window with no message in flight, where it is killed (a SuperNode that gets a message
    # of a run that has died stops taking tasks: Flower 1.41's, not fedlora's)
    config = (
        f'overrides="rounds=4 clients_per_round=3" result-dir="{result_dir}" round-timeout=15 '
        "min-nodes=4"
    )
    with _Processes(tmp_path, env) as ps:
        link = ps.start(
            "superlink",
            [exe("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(port)],
        )  # fmt: skip
        for i in range(3):
            node_port = free_port()
            ps.start(
                f"supernode{i}",
                [exe("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--isolation", "process", "--host", "127.0.0.1", "--port", str(node_port),
                 "--node-config", f"partition-id={i}"],
            )  # fmt: skip
            runner = _runner(node_port)
            if i == 2:
                runner[1:3] = [str(ROOT / "tests" / "hostile_node.py")]
            ps.start(f"runner{i}", runner)
        first = ps.start(
            "flwr-run-1", [exe("flwr"), "run", str(APP), "test", "--stream", "--run-config", config]
        )
        deadline = time.monotonic() + 300
        while True:  # until round 2's checkpoint is there
            ckpt_file = result_dir / "checkpoint.safetensors"
            if ckpt_file.exists():
                from fedlora.federation.checkpoint import load_checkpoint

                if load_checkpoint(result_dir)["round"] >= 2:
                    time.sleep(2)  # inside round 3's wait for nodes
                    break
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        (pid,) = _serverapp_pids(link.pid)
        os.kill(pid, signal.SIGKILL)
        stop([first])
        try:
            second = _resume(env, config)
        finally:
            for left in _serverapp_pids(link.pid):  # a ServerApp of a failed run: ours
                os.kill(left, signal.SIGKILL)
        out = second.stdout + second.stderr
        assert second.returncode == 0, out[-4000:]
    result = json.loads((result_dir / "result.json").read_text())
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4], [r["round"] for r in rounds]
    for r in rounds:
        assert r["aggregated"] and sorted(r["used_clients"]) == ["0", "1"], r
        assert "update norm" in r["dropped"]["2"], r["dropped"]
    assert result["rounds"][0]["capped_weights"]["2"][0] == 10**12
    log = (tmp_path / "runner2.log").read_text()
    assert "hostile node: reply 4 scaled" in log  # it sent 4 escalating replies


def _resume(env: dict, config: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [exe("flwr"), "run", str(APP), "test", "--stream", "--run-config", config + " resume=true"],
        env=env, capture_output=True, text=True, timeout=300, start_new_session=True,
    )  # fmt: skip
