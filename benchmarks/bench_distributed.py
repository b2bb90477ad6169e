"""Distributed training throughput: the same GNAQ job on W = 1 and W = 2 Ray workers.

Runs one epoch (or --steps steps) of the sharded loop in Ray Train workers for each W,
one after the other in this run, and prints edges/s, bytes sent per step against the
fp32 equivalent, peak RSS per worker, and the W=2 / W=1 throughput ratio: over all steps
(each epoch's shuffle and the first step's one-off costs included, as a run of a few steps
pays them) and over the steps after the first (the rate a long run settles at).

    python benchmarks/bench_distributed.py --dataset data/gowalla            # one epoch each
    python benchmarks/bench_distributed.py --dataset data/gowalla --steps 20 # shorter
    python benchmarks/bench_distributed.py --dataset data/gowalla --propagation full,sampled

``--launcher gloo`` runs the same worker function in W plain processes of one gloo group
instead of Ray Train workers: the loop's cost without Ray's own processes beside it.

``--propagation full`` splits full-graph propagation by owner (each worker computes its own
nodes' layers and swaps the boundary rows); ``sampled`` runs on neighbour-sampled blocks.
"""

from __future__ import annotations

import argparse
import json
import time

from gnaq_dist.config import load_config
from gnaq_dist.distributed.ray_launch import train_on_ray
from gnaq_dist.train.config import TrainConfig


def _gloo_rank(rank: int, world: int, init_file: str, config: TrainConfig, queue) -> None:
    import resource

    import torch.distributed as dist

    from gnaq_dist.distributed.trainer import train_worker

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        summary = train_worker(config)
    finally:
        dist.destroy_process_group()
    queue.put((rank, summary, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def train_on_gloo(config: TrainConfig, workers: int) -> dict:
    """Rank 0's summary of ``train_worker`` in ``workers`` spawned gloo processes (no Ray)."""
    import tempfile

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_gloo_rank, args=(r, workers, f"{tmp}/pg", config, queue))
                 for r in range(workers)]
        for p in procs:
            p.start()
        got = sorted(queue.get() for _ in range(workers))
        for p in procs:
            p.join()
    summary = got[0][1]
    summary["worker_peak_rss_mb"] = [round(rss, 1) for _, _, rss in got]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: one epoch)")
    parser.add_argument("--method", default="gnaq")
    parser.add_argument("--grad-bits", default="2")
    parser.add_argument("--fanouts", default="10,10,10", help="for sampled propagation")
    parser.add_argument("--propagation", default="sampled", help="comma-separated: full, sampled")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--out", default="runs/bench-distributed")
    parser.add_argument("--launcher", default="ray", choices=["ray", "gloo"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (repeatable), e.g. retain_freed_memory=true")
    args = parser.parse_args()
    rows = []
    runs = [(p, int(w)) for p in args.propagation.split(",") for w in args.workers.split(",")]
    for propagation, workers in runs:
        overrides = [
            f"dataset={args.dataset}", f"out={args.out}/{propagation}-w{workers}", f"model.method={args.method}",
            "schedule.epochs=1", "schedule.warmup_epochs=0", "schedule.eval_every=0",
            f"schedule.batch_size={args.batch_size}", "schedule.num_negatives=4",
            f"schedule.propagation={propagation}", f"schedule.fanouts=[{args.fanouts}]",
            f"distributed.grad_bits={args.grad_bits}", "threads=1", "progress=false",
        ] + ([f"schedule.max_steps={args.steps}"] if args.steps else []) + args.set
        config = load_config(TrainConfig, [], overrides)
        t0 = time.time()
        summary = train_on_ray(config, workers) if args.launcher == "ray" else train_on_gloo(config, workers)
        wall = time.time() - t0
        wire = summary["wire"]
        rows.append({
            "propagation": propagation, "workers": workers, "steps": summary["steps"], "wall_s": round(wall, 1),
            "s_per_step": summary["seconds_per_step"], "edges_per_s": summary["edges_per_second"],
            "steady_s_per_step": summary["steady"]["seconds_per_step"],
            "steady_edges_per_s": summary["steady"]["edges_per_second"],
            "bytes_per_step": wire["train_bytes_per_step"], "fp32_bytes_per_step": wire["train_fp32_bytes_per_step"],
            "peak_rss_mb": summary["worker_peak_rss_mb"], "recall@20": summary["metrics"].get("recall@20"),
        })
    print(f"{'propagation':>11} {'W':>2} {'steps':>5} {'s/step':>7} {'edges/s':>9} {'steady s/step':>13} "
          f"{'steady edges/s':>14} {'MB sent/step':>12} {'fp32 MB/step':>12} {'ratio':>6}  peak RSS per worker (MiB)")
    for r in rows:
        ratio = r["fp32_bytes_per_step"] / r["bytes_per_step"] if r["bytes_per_step"] else float("nan")
        print(f"{r['propagation']:>11} {r['workers']:>2} {r['steps']:>5} {r['s_per_step']:>7.3f} {r['edges_per_s']:>9.0f} "
              f"{r['steady_s_per_step'] or float('nan'):>13.3f} {r['steady_edges_per_s'] or float('nan'):>14.0f} "
              f"{r['bytes_per_step'] / 1e6:>12.2f} {r['fp32_bytes_per_step'] / 1e6:>12.2f} {ratio:>6.1f}  "
              f"{r['peak_rss_mb']}")
    for propagation in args.propagation.split(","):
        mine = [r for r in rows if r["propagation"] == propagation]
        if len(mine) >= 2:
            first, last = mine[0], mine[-1]
            steady = (f"{last['steady_edges_per_s'] / first['steady_edges_per_s']:.2f}x"
                      if last["steady_edges_per_s"] and first["steady_edges_per_s"] else "n/a")
            print(f"{propagation}: throughput W={last['workers']} / W={first['workers']}: "
                  f"{last['edges_per_s'] / first['edges_per_s']:.2f}x all steps, {steady} after the first step")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
