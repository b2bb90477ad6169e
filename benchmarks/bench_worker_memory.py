"""Where a training worker's memory goes: resident memory after each setup phase of one rank.

Runs the sharded loop's own ``DistributedTrainer`` as the ranks of a gloo group of
``--world`` processes (default 1: the worker that owns every row, the largest shard there
is) and reads each rank's VmRSS / VmHWM (peak) after: imports, setup (dataset, graph,
partition, sampler or halo plan), the warm-up start (fp rows), the quantized start (GNAQ
levels and codes from the fp rows), ``--steps`` quantized training steps and, with
``--eval-users N``, an evaluation of N users. It also prints the shard's table and Adam
bytes per node against the training floor (``b·d/8`` + fp32 levels). Comparing
``--world 1`` with ``--world 2`` shows which phases follow the shard.

    python benchmarks/bench_worker_memory.py --dataset /tmp/gnaq-scale/1-10/dataset --steps 3
    python benchmarks/bench_worker_memory.py --dataset /tmp/gnaq-scale/1-10/dataset --propagation full \
        --world 2 --eval-users 20000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time

from worker_setup import benchmark_config, quantized_worker


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rank(rank: int, world: int, args: argparse.Namespace, init_file: str, results) -> None:
    """One rank: the phases of a worker, measured in its own process; the figures go to ``results``."""
    phases: list[dict] = []
    t0 = time.perf_counter()

    def mark(name: str) -> None:
        phases.append({"phase": name, "rss_mib": round(_status_mib("VmRSS"), 1),
                       "peak_mib": round(_status_mib("VmHWM"), 1), "s": round(time.perf_counter() - t0, 1)})

    import torch

    mark("imports")
    config = benchmark_config(args.dataset, args.propagation, [
        f"model.dim={args.dim}", f"schedule.batch_size={args.batch_size}", f"schedule.fanouts=[{args.fanouts}]",
        f"eval.max_users={args.eval_users or 'null'}", "eval.batch_size=512",
        f"retain_freed_memory={str(args.retain_freed_memory).lower()}", *args.set,
    ])
    with quantized_worker(config, rank, world, init_file, mark) as trainer:
        for i, batch in enumerate(trainer.batches):
            if i >= args.steps:
                break
            trainer.step(*batch)
        mark(f"{args.steps} steps")
        metrics = None
        if args.eval_users:
            metrics, _ = trainer.evaluate()
            mark(f"evaluate {args.eval_users} users")
        # (getattr: code before 2026-12-03, run with PYTHONPATH for a before/after, has no n_train)
        n_train = getattr(trainer, "n_train", None) or trainer.data.n_train
        results.put({"rank": rank, "phases": phases, "memory": trainer.shard.memory(),
                     "rows": trainer.shard.num_owned, "n_nodes": trainer.data.n_nodes, "n_train": n_train,
                     "halo": trainer.halo.describe() if trainer.halo is not None else None, "metrics": metrics,
                     "torch": torch.__version__})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--fanouts", default="10,10,10", help="for --propagation sampled")
    parser.add_argument("--propagation", default="sampled", choices=["sampled", "full"])
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--world", type=int, default=1, help="ranks (one process each)")
    parser.add_argument("--eval-users", type=int, default=0, help="evaluate this many users at the end (0: none)")
    parser.add_argument("--retain-freed-memory", action="store_true", help="the config option of that name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override (repeatable), e.g. distributed.partition=hash")
    args = parser.parse_args()

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg")
        procs = [ctx.Process(target=_rank, args=(r, args.world, args, init_file, results)) for r in range(args.world)]
        for p in procs:
            p.start()
        got = [results.get() for _ in procs]  # before join: a full queue would block the child's exit
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    got.sort(key=lambda r: r["rank"])
    for r in got:
        print(f"rank {r['rank']} of {args.world}: {r['rows']:,} of {r['n_nodes']:,} rows, halo {r['halo']}")
        for p in r["phases"]:
            print(f"  {p['phase']:<22} RSS {p['rss_mib']:>9,.1f} MiB   peak {p['peak_mib']:>9,.1f} MiB   "
                  f"at {p['s']:>7.1f} s")
        t = {p["phase"]: p["s"] for p in r["phases"]}
        print(f"  training steps: {(t[f'{args.steps} steps'] - t['quantized start']) / max(args.steps, 1):.2f} s/step")
        m = r["memory"]
        print(f"  shard table: {m['table_bytes_per_node']:.1f} B/node, floor {m['floor_bytes_per_node']:.1f} "
              f"({m['table_over_floor']:.2f}x), fp32 {m['fp32_bytes_per_node']:.0f}; "
              f"Adam {m['optimizer_bytes_per_node']:.1f} B/node; {r['n_train']:,} train edges")
    print(json.dumps({"world": args.world, "propagation": args.propagation, "ranks": got}))


if __name__ == "__main__":
    main()
