"""The untrained model as a study's reference run: ``python -m fedlora.cli.untrained PRESET
OVERRIDES_JSON RUN_DIR``.

Builds the federation of the configuration (same data, split, evaluation examples and seed as
its trained runs), evaluates the global model before any round (a zero LoRA delta and the
initial head: the base model) and writes the files a finished run leaves for
`fedlora.cli.report.load_run`: ``config.toml``, ``metrics.jsonl`` and
``eval_examples.jsonl`` (round 0), ``summary.json``. A study compares trained runs against it
with the same paired statistics (`fedlora reproduce`, runs with ``untrained = true``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from fedlora.federation.build import build_federation, set_threads
from fedlora.federation.config import dumps_toml, load_config


def evaluate_untrained(preset: str, overrides: dict, run_dir: Path) -> dict:
    """Evaluate the untrained model of `preset` + `overrides` into `run_dir`; its summary."""
    t0 = time.perf_counter()
    cfg = load_config(preset, {**overrides, "output_dir": str(run_dir)})
    set_threads(cfg.threads)
    fed = build_federation(cfg)
    per_example: list[dict] = []
    rows = fed.evaluate_global(0, per_example)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dumps_toml(cfg))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "eval_examples.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in per_example)
    )
    summary = {"name": cfg.name, "strategy": "untrained", "rounds": 0, "bytes_up": 0,
               "bytes_down": 0, "time_total": time.perf_counter() - t0}  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":  # pragma: no cover - run by `fedlora reproduce` as a subprocess
    evaluate_untrained(sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]))
