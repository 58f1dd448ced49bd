"""``fedlora reproduce STUDY``: run a paper's study (`fedlora.cli.study`) and rebuild its page.

Each unit (one training run) is a ``fedlora run`` subprocess with one torch thread (``--jobs``
of them at once) in ``<runs>/<study>/<cell>/<label>-seed<k>/``; an interrupted unit resumes
from its checkpoint, a finished one is not rerun. When a unit finishes, its compact result
is written to ``<results>/<study>/<cell>/<label>-seed<k>.json`` (and committed with
``--commit``), then the study's section of the page is rebuilt from the results alone.
``--tables-only`` only rebuilds the page.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedlora.cli.study import (
    SCALES,
    Study,
    Unit,
    compact_result,
    load_results,
    load_study,
    result_path,
    study_names,
)
from fedlora.cli.study_page import plot_curves, render_study, write_section
from fedlora.core.contract import FedLoraError

DEFAULTS = {  # scale -> (results, page, run directories); toy never touches committed files
    "toy": ("runs/reproduce-toy/results", "runs/reproduce-toy/fidelity.md", "runs/reproduce-toy"),
    "cpu": ("results/fidelity", "docs/fidelity.md", "runs/reproduce"),
    "gpu": ("results/fidelity-gpu", "docs/fidelity-gpu.md", "runs/reproduce-gpu"),
}
IGNORED = {"output_dir", "name", "threads"}  # keys that do not change what a run computes


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "reproduce",
        help="run a paper's study and rebuild its tables (docs/fidelity.md)",
        description="Run the study STUDY (its runs, cells and seeds are data: "
        "fedlora/cli/studies/STUDY.toml), one `fedlora run` per unit, resuming interrupted "
        "units and skipping finished ones; write each unit's compact result and rebuild the "
        f"study's section of the page from the results alone. Studies: {', '.join(study_names())}.",
    )
    p.add_argument("study", help="the study to run")
    p.add_argument("--scale", default="cpu", choices=SCALES, help="toy: tiny models (seconds); "
                   "cpu: the study; gpu: the study on CUDA with parallel clients")  # fmt: skip
    p.add_argument("--cells", help="comma-separated cell names or globs (default: all)")
    p.add_argument("--tables-only", action="store_true", help="only rebuild the page")
    p.add_argument("--device", help="train.device for every unit (e.g. cuda); part of the "
                   "configuration, so recorded in each result")  # fmt: skip
    p.add_argument("--jobs", type=int, default=1, help="units run at once (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per unit (default 1)")
    p.add_argument("--results", help="results folder (default by scale; cpu: results/fidelity)")
    p.add_argument("--doc", help="the page (default by scale; cpu: docs/fidelity.md)")
    p.add_argument("--runs", help="run directories (default by scale; cpu: runs/reproduce)")
    p.add_argument("--commit", action="store_true",
                   help="git-commit each unit's compact result as it lands")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="list the units and their commands")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    study = load_study(args.study, args.scale)
    results_root, doc, runs_root = (Path(x) for x in DEFAULTS[args.scale])
    results_root = Path(args.results) if args.results else results_root
    doc = Path(args.doc) if args.doc else doc
    runs_root = Path(args.runs) if args.runs else runs_root
    units = select(study, args.cells)
    if args.device:
        units = [Unit(u.study, u.cell, u.label, u.strategy, u.seed,
                      {**u.overrides, "train.device": args.device}, u.untrained)
                 for u in units]  # fmt: skip
    failed = 0
    if not args.tables_only:
        if args.jobs < 1 or args.threads < 1:
            raise FedLoraError("--jobs and --threads: must be >= 1")
        todo = [u for u in units if not result_path(results_root, u).is_file()]
        print(f"{study.name} ({study.scale}): {len(units) - len(todo)} of {len(units)} units "
              f"finished, {len(todo)} to run", flush=True)  # fmt: skip
        if args.dry_run:
            for u in todo:
                print(f"{u.key}: {' '.join(command(study, u, runs_root, args.threads)[3:])}")
            return 0
        failed = run_units(study, todo, results_root, runs_root, args, doc)
    rebuild(study, results_root, doc)
    return 1 if failed else 0


def select(study: Study, cells: str | None) -> list[Unit]:
    """The study's units in the cells `cells` names (comma-separated names or globs)."""
    units = study.units()
    if not cells:
        return units
    pats = [c.strip() for c in cells.split(",") if c.strip()]
    names = [c["name"] for c in study.cells]
    for pat in pats:
        if not fnmatch.filter(names, pat):
            raise FedLoraError(
                f"--cells {pat!r}: no such cell in {study.name} ({', '.join(names)})"
            )
    return [u for u in units if any(fnmatch.fnmatch(u.cell, p) for p in pats)]


def rebuild(study: Study, results_root: Path, doc: Path) -> Path | None:
    """The study's section of `doc` and its figure, from the results alone."""
    results = load_results(results_root, study)
    changed = write_section(doc, study.name, render_study(study, results))
    fig = plot_curves(study, results, doc.parent / "fidelity" / f"{study.name}_curves.png")
    print(f"{doc}: section {study.name} {'rebuilt' if changed else 'unchanged'} from "
          f"{len(results)} results" + (f"; {fig}" if fig else ""))  # fmt: skip
    return fig


def run_dir(runs_root: Path, unit: Unit) -> Path:
    return runs_root / unit.study / unit.cell / f"{unit.label}-seed{unit.seed}"


def _cli_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)


def command(study: Study, unit: Unit, runs_root: Path, threads: int) -> list[str]:
    """The ``fedlora run`` of `unit`: resumed where its run directory has a checkpoint."""
    where = run_dir(runs_root, unit)
    if unit.untrained:  # the reference: evaluated before any training, same examples
        over = {**unit.overrides, "name": unit.label, "threads": threads}
        return [sys.executable, "-m", "fedlora.cli.untrained", study.preset, json.dumps(over),
                str(where)]  # fmt: skip
    cmd = [sys.executable, "-m", "fedlora.cli", "run", "-q"]
    if (where / "checkpoint.safetensors").is_file():
        return [*cmd, "--resume", str(where), "--set", f"threads={threads}"]
    cmd += ["--preset", study.preset, "--output_dir", str(where)]
    if (where / ".fedlora-run.json").is_file():
        cmd.append("--overwrite")  # started but no round finished: only its own files go
    for key, value in {**unit.overrides, "name": unit.label, "threads": threads}.items():
        cmd += ["--set", f"{key}={_cli_value(value)}"]
    return cmd


def check_run_dir(study: Study, unit: Unit, where: Path) -> None:
    """Refuse a run directory whose configuration is not the unit's (a changed study file)."""
    from fedlora.federation.config import load_config, to_dict

    saved = where / "config.toml"
    if not saved.is_file():
        return
    want = to_dict(load_config(study.preset, unit.overrides))
    have = to_dict(load_config(str(saved)))
    for section in sorted(set(want) | set(have)):
        a, b = want.get(section), have.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            diff = [f"{section}.{k}" for k in diff]
        else:
            diff = [] if a == b or section in IGNORED else [section]
        if diff:
            raise FedLoraError(
                f"{where}: its run has {diff[0]} = {_get(have, diff[0])!r}, the study's unit "
                f"{unit.key} has {_get(want, diff[0])!r}; move that folder away to rerun it"
            )


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def run_units(study, todo, results_root, runs_root, args, doc) -> int:
    """Run `todo`, `args.jobs` at a time; each finished unit's result is written (and
    committed) and the page rebuilt. Returns the number of failed units."""
    pending = list(todo)
    active: dict[int, tuple[Unit, float, Any]] = {}
    failed = 0
    while pending or active:
        while pending and len(active) < args.jobs:
            unit = pending.pop(0)
            if result_path(results_root, unit).is_file():  # landed by another runner meanwhile
                continue
            where = run_dir(runs_root, unit)
            check_run_dir(study, unit, where)
            if not claim(where):
                print(f"[{unit.key}] run by another process (pid in {_claim(where)}); skipped")
                continue
            if _finished(where):  # finished before this runner saw it: its own timing
                took = json.loads((where / "summary.json").read_text()).get("time_total", 0.0)
                land(study, unit, where, results_root, args, doc, wall=took, cpu=took,
                     resumed=False)
                release(where)
                continue
            where.parent.mkdir(parents=True, exist_ok=True)
            log = open(where.parent / f"{where.name}.log", "a")  # noqa: SIM115
            cmd = command(study, unit, runs_root, args.threads)
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            print(f"[{unit.key}] started (pid {proc.pid}, log {log.name})", flush=True)
            active[proc.pid] = (unit, time.perf_counter(), (proc, log, "--resume" in cmd))
        if not active:
            continue
        pid, status, usage = os.wait4(-1, 0)
        if pid not in active:
            continue
        unit, t0, (proc, log, resumed) = active.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.close()
        wall, cpu = time.perf_counter() - t0, usage.ru_utime + usage.ru_stime
        where = run_dir(runs_root, unit)
        if proc.returncode != 0 or not _finished(where):
            failed += 1
            print(f"[{unit.key}] FAILED (exit {proc.returncode}); see {log.name}", flush=True)
        else:
            land(study, unit, where, results_root, args, doc, wall=wall, cpu=cpu,
                 resumed=resumed)
        release(where)
    return failed


def _claim(where: Path) -> Path:
    return where.parent / f"{where.name}.claim"


def claim(where: Path) -> bool:
    """Claim a unit for this process (a file holding our pid, created exclusively), so that
    several runners of one study on one machine never run the same unit; a claim whose
    process is gone is taken over."""
    path = _claim(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
                os.kill(pid, 0)
                return pid == os.getpid()
            except (OSError, ValueError):  # its process is gone: a stale claim
                path.unlink(missing_ok=True)
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def release(where: Path) -> None:
    _claim(where).unlink(missing_ok=True)


def _finished(where: Path) -> bool:
    return (where / "summary.json").is_file()


def land(
    study, unit, where, results_root, args, doc, *, wall: float, cpu: float, resumed: bool
) -> None:
    """Write `unit`'s compact result (atomically), rebuild the page, commit if asked. `wall`
    and `cpu` are the landing process's (`resumed`: it continued an interrupted run, so they
    cover only its last part; the run's own round times are in the result's summary)."""
    settings = run_settings(study, unit, args.threads, wall, cpu, resumed)
    result = compact_result(where, unit, settings)
    path = result_path(results_root, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    tmp.replace(path)
    print(f"[{unit.key}] finished in {wall / 60:.1f} min: {path}", flush=True)
    fig = rebuild(study, results_root, doc)
    if args.commit:  # the result and the page rebuilt from it, together: they always agree
        paths = [path, doc] + ([fig] if fig else [])
        git_commit(paths, f"fidelity {study.name}: {unit.key} ({settings['hardware']['cpu']}, "
                          f"{settings['precision']}, {wall / 60:.1f} min)")  # fmt: skip


def run_settings(
    study: Study, unit: Unit, threads: int, wall: float, cpu: float, resumed: bool = False
) -> dict:
    """What made the result: precision and device as resolved here, hardware, versions, time
    (`resumed`: the landing process continued an interrupted run)."""
    import torch

    from fedlora.clients.device import (
        native_bf16,
        precision_name,
        resolve_device,
        resolve_precision,
    )
    from fedlora.federation.config import load_config

    cfg = load_config(study.preset, unit.overrides)
    device = resolve_device(cfg.train.device)
    return {
        "scale": study.scale,
        "precision": precision_name(resolve_precision(cfg.train.precision, device)),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "hardware": {"cpu": cpu_name(), "bf16_native": native_bf16(torch.device("cpu")),
                     "cores": os.cpu_count()},  # fmt: skip
        "versions": versions(),
        "time": {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "threads": threads,
                 "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed": resumed,
                 "load_avg": [round(x, 2) for x in os.getloadavg()]},  # fmt: skip
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = Path("/proc/cpuinfo").read_text()
                kind = "AMX" if " amx_bf16" in flags else (
                    "AVX512-BF16" if " avx512_bf16" in flags else "no bf16 units")
                return f"{name} ({kind})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        out["fedlora"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        out["fedlora"] = version("fedlora")
    return out


def git_commit(paths: list[Path], message: str) -> None:
    """Commit `paths` alone (other staged work is left as it is); retried while another git
    process holds the index."""
    names = [str(p) for p in paths]
    for attempt in range(5):
        add = subprocess.run(["git", "add", "--", *names], capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "-m", message, "--", *names], capture_output=True,
            text=True,
        ).returncode == 0  # fmt: skip
        if done:
            return
        time.sleep(2 + 3 * attempt)
    print(f"warning: could not commit {', '.join(names)} (git busy or not a repository)",
          flush=True)  # fmt: skip
