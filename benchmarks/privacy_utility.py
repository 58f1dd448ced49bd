"""Utility cost of differential privacy: final eval loss without DP and at epsilon ~1 and ~8,
central (client-level) and local (sample-level DP-SGD), on one preset.

    python benchmarks/privacy_utility.py --preset tiny
    python benchmarks/privacy_utility.py --preset demo --set rounds=2 --set train.local_steps=2

Runs, side by side with the same seeds: no DP, recording every client update's norm (what
it sent minus what it was sent, as central DP clips it), whose median becomes the central
``clip_norm`` (McMahan et al. 2018's advice);
central DP at target epsilon 8 and 1; local DP-SGD (``--local-clip``) at target epsilon 8 and
1. The noise multiplier of each run is solved from its target epsilon over the whole run
(`fedlora.core.privacy.plan`); the table prints it with the epsilon the accountant reports at the
end, the final eval loss on the seen clients' held-out examples and the wall time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import fedlora.engine.runner as runner
from fedlora.core.contract import payload_start
from fedlora.core.norms import adapter_norm
from fedlora.federation import build, rounds
from fedlora.federation.config import load_preset, parse_value


def run(preset: str, overrides: dict, out: str, norms: list | None = None):
    """One run; with `norms`, also every client update's norm relative to the start it was
    configured with (effective deltas, from r x r Grams), appended to `norms`."""
    cfg = load_preset(preset, {**overrides, "output_dir": out})
    build_strategy, nbytes = build.build_strategy, rounds.payload_nbytes
    seen: dict = {}

    def capture(*args, **kwargs):  # the run's strategy (its shapes and name)
        seen["strategy"] = build_strategy(*args, **kwargs)
        return seen["strategy"]

    def payload_nbytes(payload):  # the engine counts each payload right after configure
        seen["payload"] = payload
        return nbytes(payload)

    def on_update(rnd, spec, update):  # ... and calls this right after that client trained
        if norms is not None:
            s = seen["strategy"]
            start = payload_start(spec, seen["payload"], s.shapes, s.name)
            norms.append(adapter_norm(update.adapter, start))

    build.build_strategy, rounds.payload_nbytes = capture, payload_nbytes
    try:
        t0 = time.perf_counter()
        r = runner.run_experiment(cfg, progress=False, save_final=False, on_update=on_update)
        wall = time.perf_counter() - t0
    finally:
        build.build_strategy, rounds.payload_nbytes = build_strategy, nbytes
    loss = [row["loss"] for row in r.eval_rows("seen_clients")][-1]
    p = r.summary.get("privacy") or {}
    return loss, p.get("epsilon"), p.get("noise_multiplier"), p.get("clip_norm"), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", action="append", default=[], help="key=value overrides")
    ap.add_argument("--local-clip", type=float, default=1.0, help="DP-SGD per-example clip")
    ap.add_argument("--epsilons", default="8,1")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    base = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        base[k] = parse_value(v)
    base.setdefault("eval.metrics", ["loss"])
    tmp = tempfile.mkdtemp(prefix="fedlora-dp-")
    norms: list[float] = []
    rows = [("no DP", *run(args.preset, base, f"{tmp}/none", norms))]
    clip = statistics.median(norms)
    for eps in [float(e) for e in args.epsilons.split(",")]:
        for mode, c in (("central", clip), ("local", args.local_clip)):
            o = {**base, "privacy.mode": mode, "privacy.clip_norm": c}
            o["privacy.target_epsilon"] = eps
            rows.append((f"{mode}, target eps {eps:g}", *run(args.preset, o, f"{tmp}/{mode}{eps}")))
    print(f"preset {args.preset}, overrides {base}; central clip_norm = median update norm "
          f"{clip:.4g} (of {len(norms)}), local clip_norm = {args.local_clip:g}")  # fmt: skip
    print(f"{'run':<26}{'eval loss':>10}{'epsilon':>10}{'sigma':>8}{'clip':>9}{'wall s':>8}")
    for name, loss, eps, sigma, c, wall in rows:
        e = "-" if eps is None else f"{eps:.2f}"
        s = "-" if sigma is None else f"{sigma:.3f}"
        cc = "-" if c is None else f"{c:.3g}"
        print(f"{name:<26}{loss:>10.4f}{e:>10}{s:>8}{cc:>9}{wall:>8.1f}")


if __name__ == "__main__":
    main()
