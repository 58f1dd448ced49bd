"""FlexLoRA's server step on LLaMA-7B-shaped modules: fedlora's factored SVD vs the dense SVD.

    python benchmarks/aggregation.py            # 4096x4096 and 4096x11008, 10 clients
    python benchmarks/aggregation.py --quick    # 1024-sized modules, seconds

For each module shape, 10 clients (ranks 8 x 8, 30, 200 by default) upload random LoRA factors
with peft-like scales; the server forms W = sum_k p_k s_k B_k A_k and hands a rank-200 client
its best rank-200 approximation. Side by side in one run:

* dense: form W (float32, d_out x d_in) and take its full SVD (what FlexLoRA's released code
  does, ``torch.linalg.svd``), then truncate;
* fedlora: `fedlora.core.linalg.LowRankSum` / `factored_svd` on the stacked factors (QR + a small
  float64 core), never forming W.

It prints both times, the speed-up and the relative error of the rank-200 truncation
(against the dense float32 result, and both against a float64 reference), and then the peak
memory of the dense streaming path for 10, 40 and 160 clients (each in a fresh process).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from fedlora.core.linalg import LowRankSum, rank_r_factors


def client_factors(shape, ranks, seed):
    """Yield (scale * B, A, weight) per client, generated on the fly."""
    d_out, d_in = shape
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(10, 1000, (len(ranks),), generator=g).double()
    weights = (sizes / sizes.sum()).tolist()
    for r, w in zip(ranks, weights):
        A = torch.randn(r, d_in, generator=g) / d_in**0.5
        B = torch.randn(d_out, r, generator=g) * 0.01
        yield (16.0 / r) * B, A, w


def rel(a, b):
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


def compare(shape, ranks, r_out, seed=0):
    """Time the server step (aggregate, decompose, hand every client its rank-r factors)."""
    parts = list(client_factors(shape, ranks, seed))
    scales = [16.0 / r for r in ranks]

    t0 = time.perf_counter()
    acc = LowRankSum(shape)
    for G, A, w in parts:
        acc.add(G, A, w)
    U, S, Vh = acc.svd(max(ranks))
    fast = [rank_r_factors(U, S, Vh, r, s) for r, s in zip(ranks, scales)]
    t_fast = time.perf_counter() - t0

    t0 = time.perf_counter()
    W = torch.zeros(shape)
    for G, A, w in parts:
        W += w * (G @ A)
    Ud, Sd, Vhd = torch.linalg.svd(W, full_matrices=False)
    slow = [(Ud[:, :r] * Sd[:r] / s, Vhd[:r]) for r, s in zip(ranks, scales)]
    t_dense = time.perf_counter() - t0

    i = ranks.index(r_out)
    f_fast = fast[i].delta()
    f_slow = scales[i] * slow[i][0].double() @ slow[i][1].double()
    W64 = sum(w * (G.double() @ A.double()) for G, A, w in parts)
    U64, S64, Vh64 = torch.linalg.svd(W64, full_matrices=False)
    ref = (U64[:, :r_out] * S64[:r_out]) @ Vh64[:r_out]
    return t_fast, t_dense, rel(f_fast, f_slow), rel(f_fast, ref), rel(f_slow, ref)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def memory_child(shape, n_clients, rank):
    """Stream n_clients rank-`rank` updates through the dense path; print the peak RSS above
    the starting RSS (MiB). Linux: the peak (VmHWM) is reset through /proc/self/clear_refs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kib("VmRSS")
    acc = LowRankSum(shape, dense_rank=0)
    for G, A, w in client_factors(shape, [rank] * n_clients, 1):
        acc.add(G, A, w)
    acc.svd(rank)
    print(f"{(_rss_kib('VmHWM') - base) / 1024:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="1024-sized modules (seconds, not minutes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--memory-child", nargs=4, type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.memory_child:
        d_out, d_in, n, r = a.memory_child
        memory_child((d_out, d_in), n, r)
        return

    h, f = (1024, 2752) if a.quick else (4096, 11008)
    ranks = [8] * 8 + [30, 200]
    print(
        f"FlexLoRA server step, {len(ranks)} clients, ranks {ranks}, rank-200 truncation, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'module':>14} {'dense SVD s':>12} {'fedlora s':>10} {'speed-up':>9} "
        f"{'rel err vs dense':>17} {'fedlora vs f64':>15} {'dense vs f64':>13}"
    )
    for shape in [(h, h), (h, f)]:
        t_fast, t_dense, err, err64, dense64 = compare(shape, ranks, 200)
        print(
            f"{shape[0]:>6}x{shape[1]:<7} {t_dense:12.2f} {t_fast:10.3f} {t_dense / t_fast:8.0f}x "
            f"{err:17.2e} {err64:15.2e} {dense64:13.2e}"
        )

    print("\nDense streaming path (forced), peak extra RSS by number of clients (rank 200):")
    for n in (10, 40, 160):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(h), str(h), str(n), "200"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        print(f"  {n:3d} clients, {h}x{h}: {out} MiB")


if __name__ == "__main__":
    main()
