"""The training step of several methods timed round-robin on the same batches, in one process.

Averaging a run's epochs mixes its full-precision warm-up with the quantized phase, and
runs timed one after another see a machine in different states. Here every method takes
its step on the same batch in turn (each from the same fp table, through its own
trainer, so refinement and every per-method setting run as in training), for several
rounds over a few batches; a first untimed step each warms caches and compiled kernels.
The median per method is its milliseconds per step.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from gnaq_dist.interactions import InteractionData
from gnaq_dist.quant import build_method
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.local import LocalTrainer


@dataclass
class StepTiming:
    """One method's timed steps (seconds each) and their median in milliseconds."""

    name: str
    seconds: list[float]

    @property
    def median_ms(self) -> float:
        return 1000.0 * statistics.median(self.seconds)

    def as_dict(self) -> dict[str, float | int | str]:
        return {"method": self.name, "median_ms": self.median_ms, "min_ms": 1000.0 * min(self.seconds),
                "max_ms": 1000.0 * max(self.seconds), "steps": len(self.seconds)}


def time_steps_round_robin(
    configs: list[tuple[str, TrainConfig]],
    data: InteractionData,
    init_weight: torch.Tensor | None = None,
    rounds: int = 3,
    batches: int = 4,
    progress: bool = True,
) -> list[StepTiming]:
    """Time the step of each ``(name, config)`` round-robin on ``batches`` batches, ``rounds`` times.

    Each method starts from ``init_weight`` (an fp layer-0 table; None: the fp method's own
    initialisation under the first config's seed) and is quantized as its run's quantized
    phase would be; an fp config times the fp step. All use the first config's batches.
    """
    if not configs:
        return []
    if rounds < 1 or batches < 1:
        raise ValueError(f"rounds and batches must be >= 1, got {rounds} and {batches}")
    trainers = [LocalTrainer(config, data) for _, config in configs]
    first = trainers[0]
    cfg0 = configs[0][1]
    N, d, L = data.n_nodes, cfg0.model.dim, cfg0.model.num_layers
    fp = build_method("fp", N, d, None, L)
    if init_weight is not None:
        fp.init_from_full_precision(init_weight)
    states = []
    for trainer, (_, config) in zip(trainers, configs):
        if config.quantized:
            method = trainer._start_quantized_phase(fp)
            lr = config.optim.rate("quantized")
        else:
            method = build_method("fp", N, d, None, L)
            method.init_from_full_precision(fp.embed(None).detach().clone())
            lr = config.optim.lr
        states.append((trainer, method, trainer._optimizer(method, lr)))
    first.batches.set_epoch(1)
    chosen = list(itertools.islice(iter(first.batches), batches))
    for trainer, method, optimizer in states:  # untimed: caches, compiled kernels, allocator
        trainer.step(method, optimizer, *chosen[0])
    seconds: list[list[float]] = [[] for _ in states]
    bar = tqdm(total=rounds * len(chosen) * len(states), desc="timing steps", unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        for _ in range(rounds):
            for batch in chosen:
                for j, (trainer, method, optimizer) in enumerate(states):
                    t0 = time.perf_counter()
                    trainer.step(method, optimizer, *batch)
                    seconds[j].append(time.perf_counter() - t0)
                    bar.update(1)
    finally:
        bar.close()
    return [StepTiming(name, s) for (name, _), s in zip(configs, seconds)]


__all__ = ["StepTiming", "time_steps_round_robin"]
