"""Many virtual clients: Flower's simulation runtime (Ray) against the in-process engine.

    python benchmarks/flower_scale.py             # 1,000 and 1,600 clients, 50 per round, 3 rounds
    python benchmarks/flower_scale.py --clients 200 --per-round 20 --rounds 2

The same experiment (the ``tiny`` preset: tiny random Llama, every built-in task split iid over
the clients, 4 examples each, 1 local step) runs twice, side by side in one invocation:

* in-process: ``run_experiment`` in a fresh child process; peak memory = that process's max
  RSS; per-round wall time = the engine's ``time_round``;
* simulation: ``flwr run flower_app local-simulation --federation-config
  "num-supernodes=N ..."`` against a local simulation SuperLink started here (127.0.0.1, stopped
  by PID); one virtual SuperNode per client; peak memory = the largest sum of RSS over the
  SuperLink's process tree (SuperLink, ``flwr-simulation`` with the ServerApp, Ray's daemons and
  ClientApp actors), sampled every 0.5 s; per-round wall time = ``result.json``'s ``seconds``
  (configure to aggregate); memory also per kind of process at that peak and for the largest
  ClientApp actor. The ServerApp takes each virtual node's partition id from the runtime (run
  config ``hello="auto"``): no hello message per node in round 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]


def overrides(clients: int, per_round: int, rounds: int, strategy: str) -> str:
    return (
        f"rounds={rounds} clients_per_round={per_round} strategy.name={strategy} "
        f"data.tasks=none data.heldout_tasks=[] data.partition=iid data.num_clients={clients} "
        "data.test_fraction=0.1 data.max_examples_per_client=4 train.local_steps=1 "
        "train.batch_size=2 train.max_length=32 threads=1"
    )


def in_process(text: str, out: str) -> dict:
    """Child process: ``run_experiment`` on the overrides; per-round times."""
    from fedlora.engine.runner import run_experiment
    from fedlora.federation.config import load_config
    from fedlora.flower.experiment import parse_overrides

    o = parse_overrides(text)
    o.update({"output_dir": out, "eval.every": "1000000"})
    for key in ("eval.seen_clients", "eval.unseen_clients", "eval.unseen_tasks"):
        o[key] = "false"
    t = time.perf_counter()
    rows = run_experiment(load_config("tiny", o), progress=False, save_final=False).round_rows()
    return {
        "round_s": [r["time_round"] for r in rows],
        "train_s": [r["time_train"] for r in rows],
        "total_s": time.perf_counter() - t,
    }


def _kind(proc) -> str:
    """Which part of the simulation a process is (for the per-part memory)."""
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - gone or not ours
        return "other"
    if cmd.startswith("ray::ClientAppActor"):
        return "actor"  # a ClientApp actor (its process title while it has run a message)
    for part in ("flower-superlink", "flower-superexec", "flwr-simulation"):
        if part in cmd:
            return part
    return "ray daemons"


def tree_rss(pid: int) -> dict[str, list[int]]:
    """RSS (bytes) of each process in `pid`'s tree, by kind."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out: dict[str, list[int]] = {}
    for p in procs:
        try:
            out.setdefault(_kind(p), []).append(p.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
    return out


def simulation(text: str, clients: int, cpus: int, tmp: Path) -> dict:
    from fedlora.flower.local import exe, simulation_superlink, stop

    home = tmp / "home"
    home.mkdir()
    shutil.copy(ROOT / "flwr-home" / "config.toml", home / "config.toml")
    out = tmp / "sim"
    with open(tmp / "superlink.log", "w") as log:
        link, env = simulation_superlink(home, log)
        peak, parts, actor = [0], {}, [0]  # total; per kind (at the total's peak); one actor
        done = threading.Event()

        def sample():
            while not done.wait(0.5):
                now = tree_rss(link.pid)
                actor[0] = max([actor[0], *now.get("actor", [])])
                total = sum(sum(v) for v in now.values())
                if total > peak[0]:
                    peak[0] = total
                    parts.clear()
                    parts.update({k: (len(v), sum(v)) for k, v in now.items()})

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t = time.perf_counter()
        try:
            run = subprocess.run(
                [exe("flwr"), "run", "flower_app", "local-simulation", "--stream",
                 "--federation-config",
                 f"num-supernodes={clients} client-resources-num-cpus={cpus}",
                 "--run-config", f'overrides="{text}" result-dir="{out}" round-timeout=3600'],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=7200,
            )  # fmt: skip
        finally:
            total = time.perf_counter() - t
            done.set()
            sampler.join()
            stop([link])
    if run.returncode != 0 or not (out / "result.json").exists():
        sys.exit((run.stdout + run.stderr)[-4000:])
    result = json.loads((out / "result.json").read_text())
    rounds = result["rounds"]
    return {
        "round_s": [r["seconds"] for r in rounds],
        "train_s": [sum(c["train_seconds"] for c in r["client_metrics"].values()) for r in rounds],
        "used": [r["used"] for r in rounds],
        "builds": sum(
            max(r["client_metrics"][c]["model-builds"] for r in rounds if c in r["client_metrics"])
            for c in {c for r in rounds for c in r["client_metrics"]}
        ),
        # where a round's wall goes: configure (waiting for nodes, their specs), exchange
        # (messaging and the actors' work, in round 1 also Ray's start and the actors' model
        # builds), aggregate (checks, aggregation); handler = the ClientApp's own seconds
        "parts_s": [
            (r["configure_seconds"], r["exchange_seconds"], r["aggregate_seconds"],
             sum(c["handler-seconds"] for c in r["client_metrics"].values()))
            for r in rounds
        ],  # fmt: skip
        "peak_mb": peak[0] / 2**20,
        "actor_mb": actor[0] / 2**20,
        "parts_mb": {k: (n, b / 2**20) for k, (n, b) in sorted(parts.items())},
        "total_s": total,
    }


def compare(args, clients: int) -> list[str]:
    """Both runtimes on `clients` clients; the table rows and the summary line."""
    text = overrides(clients, args.per_round, args.rounds, args.strategy)
    cmd = [sys.executable, __file__, "--one", "--clients", str(clients)]
    cmd += ["--per-round", str(args.per_round), "--rounds", str(args.rounds)]
    cmd += ["--strategy", args.strategy]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    eng = json.loads(line[len("RESULT ") :])
    eng["total_s"] = time.perf_counter() - t  # with the child's start (imports)
    with tempfile.TemporaryDirectory() as tmp:
        sim = simulation(text, clients, args.cpus_per_client, Path(tmp))
    rows = []
    for name, r in (("in-process", eng), ("simulation", sim)):
        walls = " / ".join(f"{x:.1f}" for x in r["round_s"])
        train = " / ".join(f"{x:.1f}" for x in r["train_s"])
        rows.append(
            f"| {clients:,} | {name} | {walls} | {train} | {r['peak_mb']:,.0f} MB | "
            f"{r['total_s']:.0f} |"
        )
    later = slice(1, None) if args.rounds > 1 else slice(None)
    ratio = (sum(sim["round_s"][later]) / len(sim["round_s"][later])) / (
        sum(eng["round_s"][later]) / len(eng["round_s"][later])
    )
    parts = ", ".join(f"{k} {n} x = {mb:,.0f} MB" for k, (n, mb) in sim["parts_mb"].items())
    parts_s = "; ".join(
        f"round {i + 1}: {c:.1f} / {x:.1f} / {a:.1f} / {h:.1f}"
        for i, (c, x, a, h) in enumerate(sim["parts_s"])
    )
    rows.append(
        f"{clients:,} clients, simulation seconds configure / exchange / aggregate / ClientApp "
        f"handlers summed: {parts_s}"
    )
    rows.append(
        f"{clients:,} clients: simulation / in-process, mean wall of rounds after the first: "
        f"{ratio:.2f}x; peak memory {sim['peak_mb'] / eng['peak_mb']:.2f}x; clients used per "
        f"round {sim['used']}; model builds in actors {sim['builds']:.0f}; largest actor "
        f"{sim['actor_mb']:,.0f} MB; at the peak: {parts}"
    )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1000, 1600])
    ap.add_argument("--per-round", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--strategy", default="flexlora")
    ap.add_argument("--cpus-per-client", type=int, default=1, help="Ray CPUs per actor")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # child process: the in-process engine, a JSON line on stdout
        text = overrides(args.clients[0], args.per_round, args.rounds, args.strategy)
        with tempfile.TemporaryDirectory() as out:
            r = in_process(text, out)
        r["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(r))
        return 0
    load = os.getloadavg()[0]
    rows, notes = [], []
    for clients in args.clients:
        *table, parts, note = compare(args, clients)
        rows += table
        notes += [parts, note]
        print(*table, parts, note, sep="\n", flush=True)
    print(
        f"\n{args.per_round} per round, {args.rounds} rounds, {args.strategy}, tiny model, "
        f"{os.cpu_count()} CPUs, load {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    print("| clients | runtime | wall per round (s) | client training per round (s, summed) "
          "| peak memory (RSS) | total (s) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    print(*rows, sep="\n")
    print(*notes, sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
