"""The training schedule both trainers follow: batch size, steps, phases and the time budget.

One place decides how many positives a step takes (``schedule.steps_per_epoch`` or
``schedule.batch_size``), how many steps the run has, when the quantized phase starts,
when to evaluate (periodically, and once more at the end), what happens when the budget
ends inside the warm-up, and when the wall-clock budget (``schedule.max_minutes``) ends
training, so the one-process trainer and every rank of the distributed one walk the same
schedule and report their phases alike (:class:`PhaseTimes`). It also resolves what depends
on the plan: the methods' options (``gnaq_lat``'s ``latent_lr: auto`` from the quantized
steps planned) and the latent step's decay over the run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from gnaq_dist.methods import is_latent_gnaq
from gnaq_dist.train.config import TrainConfig


def _batch_size_for(config: TrainConfig, n_train: int) -> int:
    """Positives a step takes: ``schedule.batch_size`` when set, else
    ``ceil(n_train / steps_per_epoch)``."""
    sched = config.schedule
    if sched.batch_size is not None:
        return sched.batch_size
    return max(1, -(-int(n_train) // sched.steps_per_epoch))


@dataclass(frozen=True)
class Schedule:
    """The run's plan in steps and epochs, from the config and the number of train edges."""

    batch_size: int
    steps_per_epoch: int
    epochs: int
    warmup_epochs: int  # full-precision epochs (all of them for fp)
    total_steps: int
    eval_every: int
    quantized: bool
    lr_decay: str = "none"
    lr_final: float = 1.0
    quantized_steps: int = 0  # optimizer steps the quantized phase plans (0 for fp): what latent_lr=auto divides by
    latent_decay: str = "none"  # model.latent_decay: how gnaq_lat's latent step changes over the quantized phase
    latent_lr: float | None = None  # gnaq_lat's (mean) latent step, model.latent_lr resolved against the plan; None for other methods

    @classmethod
    def of(cls, config: TrainConfig, n_train: int) -> Schedule:
        sched = config.schedule
        batch = _batch_size_for(config, n_train)
        steps_per_epoch = max(1, -(-int(n_train) // batch))
        total = sched.epochs * steps_per_epoch
        if sched.max_steps is not None:
            total = min(total, sched.max_steps)
        quantized_steps = max(0, total - config.warmup_epochs * steps_per_epoch) if config.quantized else 0
        latent_lr = config.model.latent_step(quantized_steps) if is_latent_gnaq(config.model.method) else None
        return cls(batch, steps_per_epoch, sched.epochs, config.warmup_epochs, total, sched.eval_every,
                   config.quantized, config.optim.lr_decay, config.optim.lr_final, quantized_steps,
                   config.model.latent_decay, latent_lr)

    def method_options(self, config: TrainConfig) -> dict:
        """``build_method``'s options for this run: ``config.model``'s, ``latent_lr: auto`` resolved
        against :attr:`quantized_steps` (the one place both trainers take them from)."""
        return config.model.method_options(self.quantized_steps)

    def latent_factor(self, global_step: int) -> float:
        """The multiple of gnaq_lat's (mean) latent step that step ``global_step`` (0-based, warm-up
        steps included) takes: 1 without decay; with ``cosine``, ``1 + cos(pi t / T)`` at quantized
        step ``t`` of the ``T`` planned, 2 at the first and near 0 at the last (mean 1: the run's
        latent travel stays ``latent_budget``). A function of the step alone, so a resumed run
        continues on the same curve."""
        if self.latent_decay == "none" or self.quantized_steps <= 0:
            return 1.0
        t = global_step - self.warmup_epochs * self.steps_per_epoch
        progress = min(max(t / self.quantized_steps, 0.0), 1.0)
        return 1.0 + math.cos(math.pi * progress)

    def latent_lr_at(self, global_step: int) -> float:
        """gnaq_lat's latent step at step ``global_step``: :attr:`latent_lr` times :meth:`latent_factor`."""
        return self.latent_lr * self.latent_factor(global_step)

    def lr_factor(self, epoch: int) -> float:
        """The fraction of its phase's rate that ``epoch`` trains at (``optim.lr_decay``): 1 without
        decay; with ``cosine``, 1 at the phase's first epoch down to ``optim.lr_final`` at its last
        (the fp warm-up and the quantized phase each decay over their own epochs). A function of the
        epoch alone, so a resumed run continues on the same curve."""
        if self.lr_decay == "none":
            return 1.0
        fp_phase = not self.quantized or epoch <= self.warmup_epochs
        first, last = (1, self.warmup_epochs) if fp_phase else (self.warmup_epochs + 1, self.epochs)
        if last <= first:
            return 1.0
        progress = min(max((epoch - first) / (last - first), 0.0), 1.0)
        return self.lr_final + (1.0 - self.lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def quantize_at(self, epoch: int) -> bool:
        """True at the first epoch of the quantized phase."""
        return self.quantized and epoch == self.warmup_epochs + 1

    def evaluate_after(self, epoch: int) -> bool:
        """A periodic evaluation after ``epoch`` (the last one is evaluated regardless)."""
        return bool(self.eval_every) and epoch % self.eval_every == 0

    def steps_done(self, global_step: int) -> bool:
        """True once the run has taken all its steps (``schedule.max_steps`` included)."""
        return global_step >= self.total_steps

    def last_epoch(self, epoch: int, global_step: int, out_of_time: bool) -> bool:
        """Whether ``epoch``, just trained, is the run's last: the epochs, the steps or the time ran out."""
        return epoch == self.epochs or self.steps_done(global_step) or out_of_time

    def quantize_at_end(self, phase: str) -> bool:
        """The budget (``max_steps``, ``max_minutes``) ended inside a quantized method's warm-up:
        the run quantizes what it has, then evaluates that (a quantized run never ends in fp)."""
        return self.quantized and phase == "fp"

    @staticmethod
    def evaluate_at_end(metrics: dict, evaluated_last_step: bool) -> bool:
        """Whether the run's last state still needs its evaluation: none was made yet (a warm-up
        cut short and quantized, no periodic one) or the last one was of an earlier step."""
        return not metrics or not evaluated_last_step


@dataclass
class PhaseTimes:
    """Training wall time, epochs and steps of each phase (``fp``: the warm-up, or all of an fp
    run; ``quantized``), and evaluation's time: what both trainers report."""

    seconds: dict[str, float] = field(default_factory=lambda: {"fp": 0.0, "quantized": 0.0, "eval": 0.0})
    epochs: dict[str, int] = field(default_factory=lambda: {"fp": 0, "quantized": 0})
    steps: dict[str, int] = field(default_factory=lambda: {"fp": 0, "quantized": 0})

    def add_epoch(self, phase: str, seconds: float, steps: int) -> None:
        self.seconds[phase] += seconds
        self.epochs[phase] += 1
        self.steps[phase] += steps

    def train_seconds(self) -> float:
        return self.seconds["fp"] + self.seconds["quantized"]

    def seconds_per_epoch(self) -> float:
        return self.train_seconds() / max(1, self.epochs["fp"] + self.epochs["quantized"])

    def seconds_per_step(self) -> float:
        return self.train_seconds() / max(1, self.steps["fp"] + self.steps["quantized"])


class TimeBudget:
    """``schedule.max_minutes`` of wall clock from :meth:`start` (None: no budget)."""

    def __init__(self, minutes: float | None) -> None:
        self.seconds = None if minutes is None else float(minutes) * 60.0
        self.started: float | None = None

    def start(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started

    def spent(self) -> bool:
        """True once the budget is used up (never without a budget)."""
        return self.seconds is not None and self.started is not None and self.elapsed() >= self.seconds


__all__ = ["PhaseTimes", "Schedule", "TimeBudget"]
