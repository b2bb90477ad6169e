"""Early stopping for the one-process trainer: stop when a held-out metric stops improving.

``schedule.early_stopping`` names a metric (``ndcg@20``), the split it is measured on
(``valid``) and a patience in evaluations. At every evaluation of the run's last phase
the trainer hands the method over; the best evaluation's tables (and optimizer state)
are kept in memory, and at the end they replace the last ones, so the final metrics,
checkpoint and storage report are the best evaluation's. Selection never looks at the
reported split (``eval.split``) unless it is the stopping split itself.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from gnaq_dist.evaluation import evaluate_ranking, finalize, users_to_evaluate
from gnaq_dist.graph import interactions_csr
from gnaq_dist.interactions import InteractionData
from gnaq_dist.quant.base import EmbeddingMethod
from gnaq_dist.train.config import TrainConfig


class EarlyStopping:
    """Tracks the best evaluation of a run on ``schedule.early_stopping.split`` and keeps its state."""

    def __init__(self, config: TrainConfig, data: InteractionData, train_csr: tuple[np.ndarray, np.ndarray]):
        self.settings = config.schedule.early_stopping
        self.config = config
        self.train_csr = train_csr
        self.same_split = self.settings.split == config.eval.split
        if not self.same_split:
            held_user, held_item = data.split(self.settings.split)
            self.held_csr = interactions_csr(held_user, held_item, data.n_users, data.n_items)
            self.users = users_to_evaluate(self.held_csr[0], config.eval.max_users, config.seed)
        self.n_users = data.n_users
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self.best_metrics: dict[str, float] = {}  # eval.split's metrics at the best evaluation
        self.best_seconds: float = 0.0  # the phase's training seconds up to the best evaluation
        self.evaluations = 0
        self.since_best = 0
        self.stopped_epoch: int | None = None
        self._state: dict[str, torch.Tensor] | None = None
        self._optimizer_state: dict[str, Any] | None = None

    def measure(self, final: torch.Tensor, metrics: dict[str, float]) -> float:
        """The stopping metric from the final embeddings (``metrics``: eval.split's, reused
        when the stopping split is the same)."""
        if self.same_split:
            return float(metrics[self.settings.metric])
        cfg = self.config
        sums = evaluate_ranking(final[: self.n_users], final[self.n_users:], self.users, self.train_csr,
                                self.held_csr, ks=tuple(cfg.eval.ks), batch_size=cfg.eval.batch_size,
                                progress=False)
        return float(finalize(sums)[self.settings.metric])

    def observe(self, value: float, *, epoch: int, step: int, seconds: float, metrics: dict[str, float],
                method: EmbeddingMethod, optimizer: torch.optim.Optimizer) -> bool:
        """Record one evaluation; True when the patience has run out (stop training)."""
        self.evaluations += 1
        if self.best_value is None or value > self.best_value:
            self.best_value, self.best_epoch, self.best_step = value, epoch, step
            self.best_metrics, self.best_seconds = dict(metrics), seconds
            self._state = {k: v.detach().clone() for k, v in method.state_dict().items()}
            self._optimizer_state = copy.deepcopy(optimizer.state_dict())
            self.since_best = 0
            return False
        self.since_best += 1
        if self.since_best >= self.settings.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def restore(self, method: EmbeddingMethod, optimizer: torch.optim.Optimizer) -> None:
        """Put the best evaluation's tables and optimizer state back into ``method`` / ``optimizer``."""
        if self._state is not None:
            method.load_state_dict(self._state)
            optimizer.load_state_dict(self._optimizer_state)

    def report(self, last_epoch: int) -> dict[str, Any]:
        """What the run says about its stopping (the summary's and the end record's ``early_stopping``)."""
        s = self.settings
        return {"metric": s.metric, "split": s.split, "patience": s.patience, "evaluations": self.evaluations,
                "best_epoch": self.best_epoch, "best_step": self.best_step, "best_value": self.best_value,
                "best_train_seconds": self.best_seconds,
                "stopped_early": self.stopped_epoch is not None, "last_epoch": last_epoch}

    def message(self, last_epoch: int) -> str:
        s = self.settings
        why = (f"no better {s.split} {s.metric} in {s.patience} evaluations" if self.stopped_epoch is not None
               else "the budget ended")
        return (f"early stopping: {why} (last epoch {last_epoch}); the metrics and tables are epoch "
                f"{self.best_epoch}'s ({s.split} {s.metric} = {self.best_value:.4f})")


def early_stopping_for(config: TrainConfig, data: InteractionData,
                       train_csr: tuple[np.ndarray, np.ndarray]) -> EarlyStopping | None:
    """An :class:`EarlyStopping` when ``schedule.early_stopping.patience`` is set, else None."""
    return EarlyStopping(config, data, train_csr) if config.schedule.early_stopping.patience else None


__all__ = ["EarlyStopping", "early_stopping_for"]
