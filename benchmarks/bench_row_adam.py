"""The owner's Adam update of its rows: torch's elementwise form against the one-pass kernel,
side by side in one process (one torch thread, the distributed loop's allocator settings).

A rank's table at the scale benchmark's full size is about 3 M rows: 64 latent values a row
for the full-precision warm-up and the latent-row baselines, 4 levels a row for 2-bit GNAQ.
Each form runs ``--steps`` updates of every row (the full-graph step's path) and of a
``--touched`` share of rows by index (the sampled step's), on its own copy of the table;
the report gives seconds per update for each and the ratio, first update apart (it also
faults in the memory, and loads the kernel).

    python benchmarks/bench_row_adam.py --rows 3000000 --width 64 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _run(fused: bool, args: argparse.Namespace, rows: torch.Tensor | None) -> list[float]:
    from gnaq_dist.distributed.sparse_adam import RowSparseAdam

    g = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(args.rows, args.width, generator=g))
    n = args.rows if rows is None else int(rows.shape[0])
    grad = torch.randn(n, args.width, generator=g)
    opt = RowSparseAdam([param], lr=1e-3, fused=fused)
    opt.reserve()  # the moments, as the loop makes them before a phase
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        opt.step(rows, [grad])
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--width", type=int, default=64, help="values a row (64 latent, 4 GNAQ levels at 2 bits)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--touched", type=float, default=0.05, help="share of rows of the by-index updates")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is reported apart)")

    from gnaq_dist.allocator import retain_freed_memory

    torch.set_num_threads(1)
    retain_freed_memory()  # as the distributed loop does: the torch form's temporaries are reused
    picked = torch.randperm(args.rows, generator=torch.Generator().manual_seed(1))[: int(args.rows * args.touched)]
    print(f"{args.rows:,} rows x {args.width}, {args.steps} updates each; seconds per update "
          "(first, then the mean of the rest)")
    for name, rows in (("every row", None), (f"{picked.shape[0]:,} rows by index", picked.sort().values)):
        torch_s, fused_s = _run(False, args, rows), _run(True, args, rows)
        t, f = statistics.mean(torch_s[1:]), statistics.mean(fused_s[1:])
        print(f"{name:>24}: torch form {torch_s[0]:.3f}, {t:.3f} | one pass {fused_s[0]:.3f}, {f:.3f} | "
              f"{t / f:.2f}x")


if __name__ == "__main__":
    main()
