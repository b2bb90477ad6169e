"""Profile the distributed training step: ``cProfile`` of the loop's own ``step`` on every rank.

Starts ``--world`` gloo ranks (one process each, one torch thread), sets each up as the
training loop does (GNAQ 2-bit, d = 64, L = 3, batch 8,192, 4 negatives, 2-bit gradients),
runs ``--warm`` steps unprofiled, then ``--steps`` profiled ones, and prints rank 0's
seconds per step and its top functions by own time (every rank's full report goes to
``--out``). docs/notes/scale-history.md records what it found at 1/10 of the scale benchmark.

    python benchmarks/profile_step.py --dataset /tmp/gs/s10/ds --world 2 --steps 3
    python benchmarks/profile_step.py --dataset data/gowalla --world 2 --steps 8 --set retain_freed_memory=true
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
import time

from worker_setup import benchmark_config, quantized_worker


def _rank(rank: int, world: int, args: argparse.Namespace, init_file: str) -> None:
    import torch.distributed as dist

    config = benchmark_config(args.dataset, args.propagation, ["distributed.grad_bits=2", *args.set])
    with quantized_worker(config, rank, world, init_file) as trainer:
        batches = iter(trainer.batches)
        for _ in range(args.warm):
            trainer.step(*next(batches))
        dist.barrier()
        profile = cProfile.Profile()
        t0 = time.perf_counter()
        profile.enable()
        for _ in range(args.steps):
            trainer.step(*next(batches))
        profile.disable()
        per_step = (time.perf_counter() - t0) / args.steps
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
        halo = trainer.halo.describe() if trainer.halo is not None else None
        report = f"rank {rank} of {world}: {per_step:.3f} s/step, halo {halo}\n{text.getvalue()}"
        with open(os.path.join(args.out, f"rank{rank}.txt"), "w") as f:
            f.write(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--warm", type=int, default=2, help="unprofiled steps first")
    parser.add_argument("--propagation", default="full", choices=["full", "sampled"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--top", type=int, default=25, help="functions listed per rank")
    parser.add_argument("--out", default="runs/profile-step")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(args.world, args, os.path.join(tmp, "pg")), nprocs=args.world)
    with open(os.path.join(args.out, "rank0.txt")) as f:
        print(f.read())
    for r in range(1, args.world):
        with open(os.path.join(args.out, f"rank{r}.txt")) as f:
            print(f.readline().rstrip())


if __name__ == "__main__":
    main()
