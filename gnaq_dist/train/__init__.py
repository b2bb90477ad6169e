"""Training on one process, and what every trainer shares.

Exports ``TrainConfig`` (public as ``gnaq_dist.TrainConfig``), ``LocalTrainer`` and
``train_local``; the rest is internal. Importing this package imports none of its modules:
the names load on first use.

Modules:

* :mod:`.config`: ``TrainConfig``, the training settings (model, method, optimisation, schedule) and their checks;
* :mod:`.schedule`: batch size, steps, phases, evaluations and the time budget, for both trainers;
* :mod:`.ranking_loss`: the ranking loss (BPR, sampled softmax) over a step's positives and its closed-form gradient;
* :mod:`.local`: ``LocalTrainer`` / ``train_local``, the one-process trainer;
* :mod:`.early_stopping`: ``schedule.early_stopping``: the best evaluation's state kept and restored;
* :mod:`.checkpoints`: its checkpoints, in the distributed format as a world of one rank;
* :mod:`.resume_check`: the checkpoint a run would resume from, refused or accepted before any worker starts.
"""

from __future__ import annotations

from gnaq_dist.lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "gnaq_dist.train.config",
    "LocalTrainer": "gnaq_dist.train.local",
    "train_local": "gnaq_dist.train.local",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["LocalTrainer", "TrainConfig", "train_local"]
