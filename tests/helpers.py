"""Shared test helpers: random updates and float64 numpy references (independent of fedlora's
own maths)."""

from __future__ import annotations

import numpy as np
import torch

from fedlora import ClientSpec, ClientUpdate, LoraFactors

SHAPES = {"attn": (12, 10), "mlp": (16, 12)}


def spec(cid: str, ranks: dict[str, int], alpha: float = 16.0, rslora: bool = False) -> ClientSpec:
    return ClientSpec(cid, ranks, alpha=alpha, rslora=rslora)


def random_update(
    rng: np.random.Generator, s: ClientSpec, shapes=SHAPES, n: int | None = None, ranks=None
) -> ClientUpdate:
    adapter = {}
    for m, r in (ranks or s.ranks).items():
        d_out, d_in = shapes[m]
        A = torch.tensor(rng.standard_normal((r, d_in)), dtype=torch.float32)
        B = torch.tensor(rng.standard_normal((d_out, r)), dtype=torch.float32)
        adapter[m] = LoraFactors(A, B, s.scale(m))
    return ClientUpdate(s.client_id, adapter, int(n or rng.integers(1, 100)))


def np_delta(f: LoraFactors) -> np.ndarray:
    return f.scale * (f.B.double().numpy() @ f.A.double().numpy())


def np_weights(updates, uniform=False) -> np.ndarray:
    n = np.array([u.num_examples for u in updates], dtype=np.float64)
    return np.full(len(n), 1 / len(n)) if uniform else n / n.sum()


def np_exact_sum(updates, module, uniform=False) -> np.ndarray:
    """sum_k p_k scale_k B_k A_k in float64 numpy."""
    w = np_weights(updates, uniform)
    return sum(wk * np_delta(u.adapter[module]) for wk, u in zip(w, updates))


def dense(f: LoraFactors) -> np.ndarray:
    return np_delta(f)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (nb if nb > 0 else 1.0))


def np_factor_means(updates, module: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy ``(sum_k p_k A_k, sum_k p_k scale_k B_k)``, p_k proportional to n_k: the
    factors FedIT averages."""
    w = np_weights(updates)
    A = sum(wk * u.adapter[module].A.double().numpy() for wk, u in zip(w, updates))
    G = sum(
        wk * u.adapter[module].scale * u.adapter[module].B.double().numpy()
        for wk, u in zip(w, updates)
    )
    return A, G


def load_script(name: str):
    """The module ``scripts/<name>.py`` (scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
