"""How far each finished run moved its model: the Frobenius norm of its final global LoRA delta
(all adapted modules together, ``sqrt(sum_m ||scale_m B_m A_m||_F^2)``), read from the saved
PEFT adapter alone (``adapter/adapter_config.json`` + ``adapter_model.safetensors``).

    python scripts/delta_norms.py 'runs/reproduce/flexlora/*/*-seed*'
"""

from __future__ import annotations

import glob
import json
import math
import re
import sys

import torch
from safetensors.torch import load_file


def delta_norm(adapter_dir: str) -> float:
    """``||delta||_F`` over every module of the PEFT adapter in `adapter_dir` (float64)."""
    cfg = json.load(open(f"{adapter_dir}/adapter_config.json"))
    tensors = load_file(f"{adapter_dir}/adapter_model.safetensors")
    sq = 0.0
    for key, A in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        B = tensors[key.replace("lora_A", "lora_B")].double()
        A = A.double()
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        patterns = cfg.get("alpha_pattern") or {}
        alpha = next((v for p, v in patterns.items() if re.fullmatch(p, name)), cfg["lora_alpha"])
        r = A.shape[0]
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        # ||B A||_F^2 = trace((B^T B)(A A^T)): r x r products, no d_out x d_in matrix
        sq += float(torch.trace((B.T @ B) @ (A @ A.T))) * scale**2
    return math.sqrt(sq)


def main(patterns: list[str]) -> int:
    runs = sorted(d for p in patterns for d in glob.glob(p) if glob.glob(f"{d}/adapter"))
    if not runs:
        print(f"no run directory with an adapter/ matches {' '.join(patterns)}", file=sys.stderr)
        return 2
    for run in runs:
        print(f"{run}  ||delta||_F = {delta_norm(f'{run}/adapter'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["runs/*/*"]))
