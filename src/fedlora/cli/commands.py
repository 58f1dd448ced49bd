"""`fedlora` command line: run one experiment, compare strategies, rebuild reports.

fedlora run                                  # the default demo preset, one strategy
fedlora run --preset tiny --rounds 5 --strategy flexlora
fedlora run --config my.toml --set train.lr=1e-3 --set strategy.options.split=sqrt
fedlora run --resume runs/demo               # continue an interrupted run exactly
fedlora compare                              # flexlora, flora, hetlora, fedit on the demo
fedlora compare --preset tiny --strategies flexlora,fedit --seeds 0,1 --rounds 2
fedlora report runs/demo-compare             # tables, CIs, tests and plots from finished runs
"""

from __future__ import annotations

import argparse
import errno
import inspect
import logging
import re
import sys
import time
import typing
import warnings
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from fedlora.core.contract import FedLoraError

LOG = logging.getLogger("fedlora")
DEMO_STRATEGIES = ["flexlora", "flora", "hetlora", "fedit"]
#: options with a short name of their own; every other config key is `--section.key`
ALIASES = {"strategy": "strategy.name", "model": "model.name"}


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in a config dataclass's source: the one
    place a key is described, shown by ``--help``."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): .*?  # (.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).replace("%", "%%")
    return comments


def _config_fields() -> list[tuple[str, Any, Any, str]]:
    """(dotted key, type, default, description) for every configuration key."""
    from fedlora.federation.config import ExperimentConfig

    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        inst = cls()
        notes = _field_comments(cls)
        for f in fields(cls):
            tp = hints[f.name]
            if is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            else:
                out.append((f"{prefix}{f.name}", tp, getattr(inst, f.name), notes.get(f.name, "")))

    walk(ExperimentConfig, "")
    return out


def _type_label(tp: Any) -> str:
    from fedlora.federation.config import _type_name

    return _type_name(tp)


def _add_config_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "experiment", "where the configuration comes from (default: the 'demo' preset)"
    )
    src = g.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a built-in preset (see `fedlora presets`)")
    src.add_argument("--config", type=Path, help='a TOML file (may say extends = "PRESET")')
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any configuration key, e.g. --set strategy.options.split=sqrt (repeatable)",
    )
    keys = p.add_argument_group(
        "configuration keys",
        "each sets one key of the configuration (defaults shown are the dataclass defaults; a "
        "preset or --config may change them)",
    )
    alias_of = {v: k for k, v in ALIASES.items()}
    for key, tp, default, note in _config_fields():
        names = [f"--{key}"]
        if "_" in key:
            names.append(f"--{key.replace('_', '-')}")
        if key in alias_of:
            names.insert(0, f"--{alias_of[key]}")
        keys.add_argument(
            *names,
            dest=f"cfg:{key}",
            metavar="VALUE",
            default=None,
            help=f"{note + '. ' if note else ''}{_type_label(tp)}; default {default!r}",
        )


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    out = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    for item in args.set:
        if "=" not in item:
            raise FedLoraError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-3")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _load_config(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    from fedlora.federation.config import load_config

    source = str(args.config) if args.config else (args.preset or "demo")
    return load_config(source, {**_overrides(args), **(extra or {})})


def _logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def _run_one(
    cfg,
    *,
    resume: bool,
    progress: bool,
    overwrite: bool = False,
    label: str | None = None,
    parent=None,
    allow_nonempty: bool = False,
) -> dict[str, Any]:
    """Run `cfg`, write extras and plots, return the loaded run (`parent`: the comparison's
    `fedlora.federation.tracking.Parent`)."""
    from fedlora.federation.tracking import RunTracker

    tracker = RunTracker.for_config(cfg, parent=parent, log=LOG)
    try:
        run = _run_tracked(cfg, tracker, resume, progress, overwrite, label, allow_nonempty)
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.log_artifacts([run["dir"] / "plots", run["dir"] / "partition.json"])
    tracker.close()
    return run


def _run_tracked(
    cfg, tracker, resume, progress, overwrite, label, allow_nonempty=False
) -> dict[str, Any]:
    import json

    from fedlora.cli import report
    from fedlora.engine import run_experiment

    result = run_experiment(
        cfg,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        tracker=tracker,
        allow_nonempty=allow_nonempty,
    )
    report.write_run_extras(
        result.run_dir, result.strategy.global_delta(), result.specs, result.partition
    )
    if label:
        from fedlora.federation.checkpoint import atomic_write_text

        s = dict(result.summary, label=label)
        atomic_write_text(result.run_dir / "summary.json", json.dumps(s, indent=2) + "\n")
    run = report.load_run(result.run_dir)
    report.plot_run(run)
    return run


def cmd_run(args: argparse.Namespace) -> int:
    from fedlora.cli import report
    from fedlora.federation.config import load_config

    if args.resume:
        given = [f for f, v in (("--preset", args.preset), ("--config", args.config)) if v]
        if given:
            raise FedLoraError(
                f"--resume {args.resume} continues that run with its own config.toml; "
                f"{' and '.join(given)} would be ignored: leave it out (or start a new run in "
                "another --output-dir)"
            )
        saved = Path(args.resume) / "config.toml"
        if not saved.is_file():
            raise FedLoraError(f"--resume {args.resume}: no run there ({saved} does not exist)")
        cfg = load_config(str(saved), _overrides(args))
        cfg.output_dir = str(args.resume)
    else:
        cfg = _load_config(args)
    run = _run_one(
        cfg,
        resume=bool(args.resume),
        overwrite=args.overwrite,
        progress=not args.quiet,
        allow_nonempty=args.allow_nonempty,
    )
    print(report.format_table(report.summary_rows([run])))
    summary = run["summary"] or {}
    drops = sum(len(v) for v in (summary.get("dropped") or {}).values())
    if drops:
        empty = summary.get("rounds_without_update") or []
        print(
            f"\n{drops} client update(s) dropped"
            + (f", rounds {empty} without any usable update" if empty else "")
            + f": reasons in {run['dir'] / 'summary.json'} ('dropped')"
        )
    print(f"\nrun directory: {run['dir']}  (plots in {run['dir'] / 'plots'})")
    return 0


def _seeds(text: str | None, default: int) -> list[int]:
    if not text:
        return [default]
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FedLoraError(f"--seeds {text!r}: expected integers, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise FedLoraError(f"--seeds {text!r}: give distinct integers, e.g. --seeds 0,1,2")
    return seeds


def cmd_compare(args: argparse.Namespace) -> int:
    import fedlora.strategies as registry

    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    base = _load_config(args)  # validates the shared part before any training
    seeds = _seeds(args.seeds, base.seed)
    # --output-dir names the comparison's folder (one sub-folder per strategy, and per seed)
    given = vars(args).get("cfg:output_dir")
    out = Path(given or f"{base.output_dir}-compare")
    cfgs = []
    for seed in seeds:
        where = out if len(seeds) == 1 else out / f"seed{seed}"
        for name in names:
            extra: dict[str, Any] = {
                "strategy.name": name,
                "output_dir": str(where / name),
                "name": f"{base.name}-{name}",
                "seed": seed,
            }
            if name != base.strategy.name:  # the base's options belong to its own strategy
                extra["strategy.options"] = {}
            label = name
            known = name in registry.names()
            if known and registry.get_class(name).homogeneous_only and base.heterogeneous():
                # the bucket-effect baseline: every client trains the smallest rank
                extra["resources.distribution"] = "homogeneous"
                extra["resources.homogeneous_type"] = 1
                label = f"{name} (homogeneous, type-1 rank)"
            cfgs.append((_load_config(args, extra), label))
    if args.baseline and args.baseline not in names:
        raise FedLoraError(f"--baseline {args.baseline!r}: not one of --strategies {names}")
    LOG.info("comparing %s in %s, seeds %s", ", ".join(names), out, seeds)
    from fedlora.federation.tracking import CompareTracker

    tracking = CompareTracker(base.tracking, out, base.name, resume=args.resume, log=LOG)
    runs = []
    t0 = time.perf_counter()
    for cfg, label in cfgs:
        print(f"== {label}, seed {cfg.seed}", flush=True)
        runs.append(
            _run_one(
                cfg,
                resume=args.resume,
                overwrite=args.overwrite,
                progress=not args.quiet,
                label=label,
                parent=tracking.parent,
            )
        )
    text = _write_comparison(runs, out, args.baseline)
    tracking.log_artifacts([out / "compare.txt", out / "compare.json", out / "compare.png"])
    tracking.close()
    print("\n" + text)
    print(
        f"\n{len(runs)} runs in {time.perf_counter() - t0:.0f} s; {out / 'compare.txt'}, "
        f"{out / 'compare.json'}, {out / 'compare.png'}, per-run plots in <run>/plots"
    )
    return 0


def _write_comparison(runs, out: Path, baseline: str | None) -> str:
    """compare.json, compare.txt and compare.png of `runs` in `out`; returns the text."""
    import json

    from fedlora.cli import comparison

    result = comparison.compare(runs, baseline)
    text = comparison.format_compare(result)
    text += "\n\n" + "\n".join(comparison.significance_summary(result))
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "compare.txt").write_text(text + "\n")
    comparison.plot_compare(runs, out)
    return text


def _run_dirs(paths: list[str]) -> list[Path]:
    """Run directories: each path that holds a run, and the runs below each one that does not."""
    dirs: list[Path] = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").is_file():
            dirs.append(p)
        else:
            found = sorted(m.parent for m in p.glob("**/metrics.jsonl"))
            if not found:
                raise FedLoraError(f"{p}: no fedlora run (metrics.jsonl) in or below it")
            dirs += found
    return dirs


def cmd_report(args: argparse.Namespace) -> int:
    import json
    import os

    from fedlora.cli import report

    dirs = _run_dirs(args.run_dirs)
    runs = [report.load_run(d) for d in dirs]
    for run in runs:
        report.plot_run(run)
    if len(runs) == 1:
        print(report.format_table(report.summary_rows(runs)))
        return 0
    if args.output_dir:
        out = Path(args.output_dir)
    elif len(args.run_dirs) == 1 and dirs[0] != Path(args.run_dirs[0]):
        out = Path(args.run_dirs[0])  # a comparison's folder
    else:
        out = Path(os.path.commonpath([d.resolve() for d in dirs]))
    previous = out / "compare.json"
    baseline = args.baseline
    if previous.is_file():  # keep the comparison's order (and baseline) when rebuilding it
        old = json.loads(previous.read_text())
        order = {label: i for i, label in enumerate(old.get("order", []))}
        runs.sort(key=lambda r: order.get(r["name"], len(order)))
        baseline = baseline or old.get("baseline")
    print(_write_comparison(runs, out, baseline))
    print(f"\n{out / 'compare.txt'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from fedlora.federation.config import PRESET_DIR, preset_names

    for name in preset_names():
        first = (PRESET_DIR / f"{name}.toml").read_text().splitlines()
        doc = " ".join(line.lstrip("# ").strip() for line in first if line.startswith("#"))
        print(f"{name:16s} {doc[:150]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedlora",
        description="Federated fine-tuning with heterogeneous LoRA adapters.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
        sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    run = sub.add_parser(
        "run",
        help="run one experiment",
        description="Run one federated experiment on the in-process engine: progress, metrics "
        "(metrics.jsonl), summary table, plots and checkpoints after every round in the run "
        "directory (output_dir).",
    )
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its last checkpoint (same metrics as uninterrupted)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in the output directory (only the files fedlora wrote "
        "there, listed in its .fedlora-run.json); without it such a directory is refused",
    )
    run.add_argument(
        "--allow-nonempty",
        action="store_true",
        help="write the run into an existing non-empty folder that is not a run directory "
        "(refused anyway if it holds a file of a name the run writes)",
    )
    common(run)
    _add_config_options(run)
    run.set_defaults(func=cmd_run)

    cmp_ = sub.add_parser(
        "compare",
        help="compare strategies on the same partition, resources and seeds",
        description="Run several strategies on the same data partition, client resources and "
        "seeds; print a table (final/best metric, bytes, wall time) and plot all curves. "
        "Strategies that need homogeneous ranks (fedit, fedex_lora) run as the bucket-effect "
        "baseline: every client at the smallest rank type.",
    )
    cmp_.add_argument(
        "--strategies",
        default=",".join(DEMO_STRATEGIES),
        help=f"comma-separated strategy names (default {','.join(DEMO_STRATEGIES)})",
    )
    cmp_.add_argument(
        "--seeds",
        help="comma-separated seeds, e.g. 0,1,2: every strategy runs once per seed (within a "
        "seed all share partition, resources, sampling and evaluation examples); default: the "
        "configuration's seed",
    )
    cmp_.add_argument(
        "--baseline",
        help="the strategy the others are tested against (default: the homogeneous fedit run "
        "if compared, else the first strategy)",
    )
    cmp_.add_argument("--resume", action="store_true", help="resume each run from its checkpoint")
    cmp_.add_argument(
        "--overwrite", action="store_true", help="replace runs already in the output directories"
    )
    common(cmp_)
    _add_config_options(cmp_)
    cmp_.set_defaults(func=cmd_compare)

    rep = sub.add_parser(
        "report",
        help="rebuild tables and plots from finished runs",
        description="Rebuild each run's plots and, for several runs, the comparison "
        "(compare.txt, compare.json, compare.png) from run directories or a comparison folder.",
    )
    rep.add_argument("run_dirs", nargs="+", help="run directories, or folders holding runs")
    rep.add_argument(
        "--output-dir",
        help="where the comparison goes (default: the folder given, or the runs' parent)",
    )
    rep.add_argument(
        "--baseline",
        help="label or strategy of the baseline (default: the previous comparison's, else "
        "the homogeneous fedit run, else the first)",
    )
    common(rep)
    rep.set_defaults(func=cmd_report)

    from fedlora.cli.reproduce import add_parser as add_reproduce

    add_reproduce(sub)

    pre = sub.add_parser("presets", help="list the built-in presets")
    common(pre)
    pre.set_defaults(func=cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    # a deprecation notice raised inside peft on every adapter switch; it says nothing to users
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    args = build_parser().parse_args(argv)
    _logging(args)
    try:
        return args.func(args)
    except (FedLoraError, FileNotFoundError) as e:
        return _error(e)
    except OSError as e:
        if e.errno not in DISK_ERRORS and not _raised_by_fedlora(e):
            raise  # a real internal error: keep its traceback visible
        return _error(_disk_error(e, args) if e.errno in DISK_ERRORS else e)
    except (ValueError, UnicodeError) as e:
        if not _raised_by_fedlora(e):
            raise  # a real internal error: keep its traceback visible
        return _error(e)
    except KeyboardInterrupt:
        print(
            "\nfedlora: interrupted; resume with `fedlora run --resume <output_dir>`",
            file=sys.stderr,
        )
        return 130


#: a write the disk refused: the user's to fix, not a bug (one line, exit 2)
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _disk_error(e: OSError, args: argparse.Namespace) -> str:
    """One line for a refused write: which file, why, and that nothing checkpointed is lost."""
    where = f"{e.filename}: " if e.filename else ""
    resume = " (`fedlora run --resume <output_dir>` continues after the last checkpoint)"
    return (
        f"{where}cannot write: {e.strerror or e}; the rounds checkpointed so far are intact; "
        "free space and run again" + (resume if getattr(args, "func", None) is cmd_run else "")
    )


def _error(e: BaseException | str) -> int:
    """One line on stderr, exit status 2 (bad input)."""
    text = " ".join(str(e).split()) if "\n  - " not in str(e) else str(e)
    print(f"fedlora: error: {text}", file=sys.stderr)
    return 2


def _raised_by_fedlora(e: BaseException) -> bool:
    """Whether `e` was raised by fedlora's own checks (its innermost frame is in the fedlora
    package), as opposed to from inside a library it calls."""
    tb = e.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    package = str(Path(__file__).resolve().parent.parent)  # src/fedlora
    return str(Path(last.tb_frame.f_code.co_filename).resolve()).startswith(package)


if __name__ == "__main__":
    sys.exit(main())
