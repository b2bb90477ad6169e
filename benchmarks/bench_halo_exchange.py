"""The halo's float rows between ranks of one host: the process group (gloo, TCP over loopback)
against shared memory (``FixedExchange`` with ``shared_memory_dir``), side by side.

Starts ``--world`` gloo ranks (one process each, one torch thread). Each needs ``--rows``
rows of the others (a halo grouped by owner, as a ``HaloPlan``'s), pulls them and pushes
their gradients back ``--calls`` times through each transport, and reports per call and
rank the wall time and the CPU time of its process (all its threads, the kernel's TCP work
included), then the ratios. At the scale benchmark's full size a halo is about 1.6 M rows
of 64 fp32 values (docs/notes/scale-history.md, "the halo's rows through shared memory").

    python benchmarks/bench_halo_exchange.py --rows 1600000 --calls 5
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rank(rank: int, world: int, args: argparse.Namespace, init_file: str, out_dir: str) -> None:
    from gnaq_dist.distributed.halo_exchange import FixedExchange
    from gnaq_dist.distributed.partition import Partition

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    own = args.rows  # every rank owns as many rows as it needs from the others
    owner = np.repeat(np.arange(world, dtype=np.int32), own)
    part = Partition.from_owner(owner, world, owner.shape[0], 0)
    rng = np.random.default_rng(rank)
    remote = np.concatenate([np.sort(rng.choice(part.owned_ids(r), own // (world - 1), replace=False))
                             for r in range(world) if r != rank])  # grouped by owner
    x_own = torch.randn(own, args.dim)
    lines = []
    for name, directory in (("process group", None), ("shared memory", args.shm_dir)):
        plan = FixedExchange(torch.from_numpy(remote), part, shared_memory_dir=directory)
        halo = torch.empty(remote.shape[0], args.dim)
        into = torch.zeros(own, args.dim)
        plan.reserve(x_own)
        plan.start_pull_rows(x_own, halo).wait()  # first touch of every buffer, untimed
        dist.barrier()
        t, c = time.perf_counter(), _cpu()
        for _ in range(args.calls):
            plan.start_pull_rows(x_own, halo).wait()
            grad = plan.push_buffer(halo)
            grad = halo if grad is None else grad.copy_(halo)
            plan.start_push_gradients(grad).wait(into)
        dist.barrier()
        wall, cpu = (time.perf_counter() - t) / args.calls, (_cpu() - c) / args.calls
        used = "shared" if plan._served is not None else "process group"
        lines.append((name, wall, cpu, used))
        plan.release()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        for name, wall, cpu, used in lines:
            f.write(f"{name}\t{wall}\t{cpu}\t{used}\n")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rows", type=int, default=400_000, help="halo rows each rank needs")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--calls", type=int, default=5, help="timed pull + push pairs per transport")
    parser.add_argument("--shm-dir", default="/dev/shm")
    args = parser.parse_args()
    if args.world < 2:
        parser.error("--world must be at least 2")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_rank, args=(args.world, args, init_file, tmp), nprocs=args.world)
        rows = [[line.split("\t") for line in open(os.path.join(tmp, f"rank{r}.txt")).read().splitlines()]
                for r in range(args.world)]
    mib = args.rows * args.dim * 4 / 2**20
    print(f"{args.world} ranks, {args.rows:,} halo rows x {args.dim} fp32 each ({mib:,.0f} MiB), "
          f"a pull and a push per call, {args.calls} calls")
    print(f"{'rank':>4}  {'transport':<14} {'used':<14} {'wall ms/call':>12} {'CPU ms/call':>12}")
    for r, per in enumerate(rows):
        for name, wall, cpu, used in per:
            print(f"{r:>4}  {name:<14} {used:<14} {float(wall) * 1e3:>12.0f} {float(cpu) * 1e3:>12.0f}")
        (_, w0, c0, _), (_, w1, c1, _) = per
        print(f"{r:>4}  process group / shared memory: wall {float(w0) / float(w1):.2f}x, "
              f"CPU {float(c0) / float(c1):.2f}x")


if __name__ == "__main__":
    main()
