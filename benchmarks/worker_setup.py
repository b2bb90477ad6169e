"""The benchmarks' training worker: one rank of a gloo group, set up as the training loop sets
itself up and brought to the start of the quantized phase (GNAQ 2-bit, d = 64, L = 3, batch
8,192, 4 negatives, one thread). Shared by ``bench_worker_memory.py`` and ``profile_step.py``,
which run the loop's own ``step`` from there; imported by path (``benchmarks/`` is the
scripts' directory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager


def benchmark_config(dataset: str, propagation: str, overrides: Sequence[str] = ()):
    """The worker's TrainConfig; ``overrides`` (``key=value``) come last and win."""
    from gnaq_dist.config import load_config
    from gnaq_dist.train.config import TrainConfig

    return load_config(TrainConfig, [], [
        f"dataset={dataset}", "model.method=gnaq", "model.bits=2", "model.dim=64", "model.num_layers=3",
        "schedule.epochs=1", "schedule.warmup_epochs=0", "schedule.eval_every=0", "schedule.batch_size=8192",
        "schedule.num_negatives=4", f"schedule.propagation={propagation}", "threads=1", "progress=false",
        *overrides,
    ])


@contextmanager
def quantized_worker(config, rank: int, world: int, init_file: str,
                     mark: Callable[[str], None] = lambda phase: None) -> Iterator:
    """This rank's ``DistributedTrainer`` at the quantized start, epoch 1's batches ready; ``mark``
    is called after each setup phase. The process group is destroyed on exit."""
    import torch.distributed as dist

    from gnaq_dist.distributed.trainer import DistributedTrainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = DistributedTrainer(config)
        mark("setup")
        trainer._start_fp()
        mark("warm-up start")
        trainer._start_quantized()
        mark("quantized start")
        trainer._reserve_step_tables()  # as the loop does before an epoch's steps
        trainer.batches.set_epoch(1)
        yield trainer
    finally:
        dist.destroy_process_group()
