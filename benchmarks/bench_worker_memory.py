"""Where a training worker's memory goes: resident memory after each setup phase of one rank.

Runs the sharded loop's own ``DistributedTrainer`` as rank 0 of a one-rank gloo group in
this process (W = 1: the worker that owns every row, the largest shard there is) and
reads VmRSS / VmHWM (peak) after: imports, setup (dataset, graph, partition, sampler),
the warm-up start (fp rows), the quantized start (GNAQ levels and codes from the fp
rows), and ``--steps`` quantized training steps. It also prints the shard's table and
Adam bytes per node against the training floor (``b·d/8`` + fp32 levels).

    python benchmarks/bench_worker_memory.py --dataset /tmp/gnaq-scale/1-10/dataset --steps 3
    python benchmarks/bench_worker_memory.py --dataset /tmp/gnaq-scale/1-10/dataset --propagation full

Without an evaluation (that needs the whole table on every rank; see docs/scale.md).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--fanouts", default="10,10,10", help="for --propagation sampled")
    parser.add_argument("--propagation", default="sampled", choices=["sampled", "full"])
    parser.add_argument("--batch-size", type=int, default=8192)
    args = parser.parse_args()

    phases: list[dict] = []
    t0 = time.perf_counter()

    def mark(name: str) -> None:
        phases.append({"phase": name, "rss_mib": round(_status_mib("VmRSS"), 1),
                       "peak_mib": round(_status_mib("VmHWM"), 1), "s": round(time.perf_counter() - t0, 1)})
        p = phases[-1]
        print(f"{name:<18} RSS {p['rss_mib']:>9,.1f} MiB   peak {p['peak_mib']:>9,.1f} MiB   at {p['s']:>7.1f} s",
              flush=True)

    import torch
    import torch.distributed as dist

    from gnaq_dist.config import load_config
    from gnaq_dist.distributed.loop import DistributedTrainer
    from gnaq_dist.train.config import TrainConfig

    mark("imports")
    config = load_config(TrainConfig, [], [
        f"dataset={args.dataset}", "model.method=gnaq", "model.bits=2", f"model.dim={args.dim}",
        "model.num_layers=3", "schedule.epochs=1", "schedule.warmup_epochs=0", "schedule.eval_every=0",
        f"schedule.batch_size={args.batch_size}", "schedule.num_negatives=4", f"schedule.propagation={args.propagation}",
        f"schedule.fanouts=[{args.fanouts}]", "threads=1", "progress=false",
    ])
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'pg')}", rank=0, world_size=1)
        try:
            trainer = DistributedTrainer(config)
            mark("setup")
            trainer._start_fp()
            mark("warm-up start")
            trainer._start_quantized()
            mark("quantized start")
            trainer.batches.set_epoch(1)
            for i, (users, pos, neg) in enumerate(trainer.batches):
                if i >= args.steps:
                    break
                trainer.step(users, pos, neg)
            mark(f"{args.steps} steps")
            memory = trainer.shard.memory()
        finally:
            dist.destroy_process_group()
    print(f"shard table: {memory['table_bytes_per_node']:.1f} B/node, floor {memory['floor_bytes_per_node']:.1f} "
          f"({memory['table_over_floor']:.2f}x), fp32 {memory['fp32_bytes_per_node']:.0f}; "
          f"Adam {memory['optimizer_bytes_per_node']:.1f} B/node; "
          f"{trainer.data.n_nodes:,} nodes, {int(trainer.graph.n_edges):,} train edges")
    print(json.dumps({"phases": phases, "memory": memory, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
