"""Training on one process, and what every trainer shares.

* :mod:`.config`: ``TrainConfig``, the training settings (model, method, optimisation, schedule) and their checks;
* :mod:`.schedule`: batch size, steps, phases, evaluations and the time budget, for both trainers;
* :mod:`.bpr`: the BPR loss over a step's positives and its gradient on the final rows;
* :mod:`.local`: ``LocalTrainer`` / ``train_local``, the one-process trainer;
* :mod:`.checkpoints`: its checkpoints, in the distributed format as a world of one rank;
* :mod:`.resume_check`: the checkpoint a run would resume from, refused or accepted before any worker starts.
"""
