"""What Flower costs outside client training: one experiment in-process and on Flower.

    python benchmarks/flower_overhead.py                       # demo (SmolLM2), 2 rounds, 2 clients
    python benchmarks/flower_overhead.py --preset tiny --steps 1   # a smoke run

The same experiment (default: the ``demo`` preset, SmolLM2-135M-Instruct, cut to 2 rounds,
2 clients that both train in every round, 2 local steps, 1 torch thread per process, no
evaluation) runs on four runtimes, one after the other in one invocation:

* ``in-process``: ``run_experiment`` (a fresh child process); clients train one after another;
* ``deployment``: SuperLink + one SuperNode per client on 127.0.0.1 with Flower's default
  ``--isolation subprocess`` (a fresh ClientApp process, and model build, per message);
* ``deployment+runner``: the same with ``--isolation process`` and
  `fedlora.flower.node_runner` (one ClientApp process per node for the run);
* ``simulation``: the local simulation runtime (Ray), one virtual SuperNode per client, 1 CPU
  per actor.

Per round: the wall time (in-process: the engine's ``time_round``; Flower: ``result.json``'s
``seconds``, from configure to aggregated, as the ServerApp sees it) and the client training
time on the round's critical path (in-process: the sum of the clients' ``train_seconds``, as
they train in turn; Flower: the largest ``train_seconds``, as nodes train side by side).
"outside" = 1 - training / wall: what the runtime adds. For Flower it is split into the
slowest node's ClientApp handler beyond training (decode, model build, encode: the reply's
``handler-seconds`` - ``train_seconds``), messaging (the ServerApp's send-and-receive time
beyond that handler: transport, the Grid's and SuperNodes' polling, ClientApp process starts,
Ray dispatch) and the server (configure incl. waiting for nodes and hellos, checks and
aggregation). Also: the model builds per node over the run and the seconds of one build,
and each runtime's total wall time (process starts and the ServerApp's own model load
included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "flower_app"


def overrides(rounds: int, clients: int, steps: int) -> str:
    return (
        f"rounds={rounds} data.num_clients={clients} clients_per_round={clients} "
        f"train.local_steps={steps} threads=1"
    )


def in_process(preset: str, text: str, out: str) -> dict:
    from fedlora.engine.runner import run_experiment
    from fedlora.federation.config import load_config
    from fedlora.flower.experiment import parse_overrides

    o = parse_overrides(text)
    o.update({"output_dir": out, "eval.every": "1000000"})
    for key in ("eval.seen_clients", "eval.unseen_clients", "eval.unseen_tasks"):
        o[key] = "false"
    rows = run_experiment(load_config(preset, o), progress=False, save_final=False).round_rows()
    return {
        "walls": [r["time_round"] for r in rows],
        "train": [r["time_train"] for r in rows],
        "builds": 1,
    }


def _flower_rows(result_dir: Path) -> dict:
    rounds = json.loads((result_dir / "result.json").read_text())["rounds"]
    clients = {c for r in rounds for c in r["client_metrics"]}
    loads = [m["model-load-seconds"] for r in rounds for m in r["client_metrics"].values()]
    slowest = [
        max(r["client_metrics"].values(), key=lambda m: m["handler-seconds"]) for r in rounds
    ]
    return {
        "walls": [r["seconds"] for r in rounds],
        "train": [max(m["train_seconds"] for m in r["client_metrics"].values()) for r in rounds],
        # the slowest node's handler beyond its training: decode, model build, encode
        "node": [m["handler-seconds"] - m["train_seconds"] for m in slowest],
        # send and receive beyond the slowest node's handler: transport, polling, process starts
        "messaging": [
            r["exchange_seconds"] - m["handler-seconds"] for r, m in zip(rounds, slowest)
        ],
        "server": [r["configure_seconds"] + r["aggregate_seconds"] for r in rounds],
        "used": [r["used"] for r in rounds],
        "builds": max(  # per node over the run (Flower keeps the count in its node state)
            max(r["client_metrics"][c]["model-builds"] for r in rounds if c in r["client_metrics"])
            for c in clients
        ),
        "load_s": max(loads),
    }


def _flwr_run(env: dict, connection: str, run_config: str, extra: list[str]) -> None:
    from fedlora.flower.local import exe

    run = subprocess.run(
        [exe("flwr"), "run", str(APP), connection, "--stream", *extra, "--run-config",
         run_config],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if run.returncode != 0:
        sys.exit((run.stdout + run.stderr)[-4000:])


def deployment(preset: str, text: str, clients: int, runner: bool, tmp: Path) -> dict:
    from fedlora.flower.local import exe, free_port, start, stop

    home = tmp / "home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "b"\n\n[superlink.b]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    procs = []
    logs = [open(tmp / f"{n}.log", "w") for n in ("link", *[f"node{i}" for i in range(clients)])]
    try:
        procs.append(start([exe("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                            "--port", str(port)], env, logs[0]))  # fmt: skip
        for i in range(clients):
            node_port = free_port()
            procs.append(start(
                [exe("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--isolation", "process" if runner else "subprocess",
                 "--host", "127.0.0.1", "--port", str(node_port),
                 "--node-config", f"partition-id={i}"],
                env, logs[i + 1],
            ))  # fmt: skip
            if runner:
                procs.append(start(
                    [sys.executable, "-m", "fedlora.flower.node_runner",
                     "--runtime-api-address", f"127.0.0.1:{node_port}", "--insecure"],
                    env, logs[i + 1],
                ))  # fmt: skip
        out = tmp / "result"
        _flwr_run(env, "b", f'experiment="{preset}" overrides="{text}" result-dir="{out}" '
                  "round-timeout=3600", [])  # fmt: skip
    finally:
        stop(procs)
        for log in logs:
            log.close()
    return _flower_rows(out)


def simulation(preset: str, text: str, clients: int, tmp: Path) -> dict:
    from fedlora.flower.local import simulation_superlink, stop

    home = tmp / "home"
    home.mkdir()
    shutil.copy(ROOT / "flwr-home" / "config.toml", home / "config.toml")
    out = tmp / "result"
    with open(tmp / "superlink.log", "w") as log:
        link, env = simulation_superlink(home, log)
        try:
            _flwr_run(
                env, "local-simulation",
                f'experiment="{preset}" overrides="{text}" result-dir="{out}" round-timeout=3600',
                ["--federation-config", f"num-supernodes={clients} client-resources-num-cpus=1"],
            )  # fmt: skip
        finally:
            stop([link])
    return _flower_rows(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="local steps")
    ap.add_argument(
        "--runtimes", nargs="+",
        default=["in-process", "deployment", "deployment+runner", "simulation"],
    )  # fmt: skip
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    text = overrides(args.rounds, args.clients, args.steps)
    if args.one:  # child process: the in-process engine
        with tempfile.TemporaryDirectory() as out:
            print("RESULT " + json.dumps(in_process(args.preset, text, out)))
        return 0
    results = {}
    for name in args.runtimes:
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            if name == "in-process":
                cmd = [sys.executable, __file__, "--one", "--preset", args.preset]
                cmd += ["--rounds", str(args.rounds), "--clients", str(args.clients)]
                cmd += ["--steps", str(args.steps)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
                r = json.loads(line[len("RESULT ") :])
            elif name == "simulation":
                r = simulation(args.preset, text, args.clients, Path(tmp))
            else:
                runner = name == "deployment+runner"
                r = deployment(args.preset, text, args.clients, runner, Path(tmp))
        r["total"] = time.perf_counter() - t
        results[name] = r
        print(f"{name}: {json.dumps(r)}", flush=True)
    print(
        f"\n{args.preset}: {args.rounds} rounds, {args.clients} clients (all train every round), "
        f"{args.steps} local steps, 1 thread per process; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print("| runtime | wall per round (s) | training | outside training | node: build, decode, "
          "encode | messaging | server: configure, aggregate | model builds per node | "
          "total (s) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def cells(xs):
        return " / ".join(f"{x:.1f}" for x in xs) if xs else "-"

    for name, r in results.items():
        outside = " / ".join(f"{1 - t / w:.0%}" for t, w in zip(r["train"], r["walls"]))
        builds = f"{r['builds']:.0f}" + (f" ({r['load_s']:.1f} s each)" if "load_s" in r else "")
        print(f"| {name} | {cells(r['walls'])} | {cells(r['train'])} | {outside} | "
              f"{cells(r.get('node'))} | {cells(r.get('messaging'))} | {cells(r.get('server'))} "
              f"| {builds} | {r['total']:.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
