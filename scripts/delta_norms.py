"""How far each finished run moved its model: the Frobenius norm of its final global LoRA delta
(all adapted modules together, ``sqrt(sum_m ||scale_m B_m A_m||_F^2)``), read from the saved
PEFT adapter alone (``adapter/adapter_config.json`` + ``adapter_model.safetensors``), and how
many modules moved at all (a nonzero delta). With ``--kinds``, also per module kind (the name
with its layer number replaced by ``*``): modules moved and the kind's share of ``||delta||^2``.

    python scripts/delta_norms.py 'runs/reproduce/flexlora/*/*-seed*'
    python scripts/delta_norms.py --kinds 'runs/reproduce/lora_a2/dir0.1-r1/*-seed0'
"""

from __future__ import annotations

import glob
import json
import math
import re
import sys

import torch
from safetensors.torch import load_file


def module_norms(adapter_dir: str) -> dict[str, float]:
    """Module name -> ``||scale B A||_F`` of the PEFT adapter in `adapter_dir` (float64)."""
    cfg = json.load(open(f"{adapter_dir}/adapter_config.json"))
    tensors = load_file(f"{adapter_dir}/adapter_model.safetensors")
    patterns = cfg.get("alpha_pattern") or {}
    norms = {}
    for key, A in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        B = tensors[key.replace("lora_A", "lora_B")].double()
        A = A.double()
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        alpha = next((v for p, v in patterns.items() if re.fullmatch(p, name)), cfg["lora_alpha"])
        r = A.shape[0]
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        # ||B A||_F^2 = trace((B^T B)(A A^T)): r x r products, no d_out x d_in matrix
        sq = float(torch.trace((B.T @ B) @ (A @ A.T))) * scale**2
        norms[name] = math.sqrt(max(sq, 0.0))
    return norms


def frobenius(norms: dict[str, float]) -> float:
    """``||delta||_F`` over all modules, from their norms (`module_norms`)."""
    return math.sqrt(sum(v**2 for v in norms.values()))


def delta_norm(adapter_dir: str) -> float:
    """``||delta||_F`` over every module of the PEFT adapter in `adapter_dir` (float64)."""
    return frobenius(module_norms(adapter_dir))


def by_kind(norms: dict[str, float]) -> dict[str, tuple[int, int, float]]:
    """Module kind -> (modules moved, modules, share of ``||delta||^2``)."""
    total = sum(v**2 for v in norms.values()) or 1.0
    kinds: dict[str, list[float]] = {}
    for name, v in norms.items():
        kinds.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(v)
    return {
        k: (sum(v > 0 for v in vs), len(vs), sum(v**2 for v in vs) / total)
        for k, vs in sorted(kinds.items())
    }


def main(args: list[str]) -> int:
    kinds = "--kinds" in args
    patterns = [a for a in args if a != "--kinds"] or ["runs/*/*"]
    runs = sorted(d for p in patterns for d in glob.glob(p) if glob.glob(f"{d}/adapter"))
    if not runs:
        print(f"no run directory with an adapter/ matches {' '.join(patterns)}", file=sys.stderr)
        return 2
    for run in runs:
        norms = module_norms(f"{run}/adapter")
        moved = f"modules moved: {sum(v > 0 for v in norms.values())} of {len(norms)}"
        print(f"{run}  ||delta||_F = {frobenius(norms):.3f}  {moved}")
        for kind, (k, n, share) in (by_kind(norms) if kinds else {}).items():
            print(f"    {kind}: {k} of {n} moved, {100 * share:.1f}% of ||delta||^2")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
