"""``model.latent_lr: auto`` and ``model.latent_decay``: gnaq_lat's latent step from the run's plan.

The step is ``model.latent_budget`` over the quantized optimizer steps the schedule plans
(quantized epochs x steps an epoch, ``max_steps`` included), resolved by the schedule for
both trainers; a number sets it directly; bad values are one-line ConfigErrors. The
one-process trainer trains with the resolved step and reports it (metrics.jsonl's start
record, the result, summary.json); every rank of the distributed trainer resolves the same
step as the one-process trainer (gloo ranks)."""

from __future__ import annotations

import json
import math

import pytest

from distributed_utils import run_ranks
from gnaq_dist.config import load_config
from gnaq_dist.errors import ConfigError
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.config import ModelConfig, TrainConfig
from gnaq_dist.train.local import LocalTrainer
from gnaq_dist.train.schedule import Schedule


def config(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, [], ["model.method=gnaq_lat", "model.bits=2", *overrides])


@pytest.mark.parametrize("overrides, n_train, steps", [
    # Gowalla's scratch budget: 4 steps an epoch, 40 epochs, no warm-up
    (["schedule.epochs=40", "schedule.warmup_epochs=0", "schedule.steps_per_epoch=4"], 727_869, 160),
    # Last.fm's: batch 2,048 over 37,816 train edges = 19 steps an epoch, 40 epochs
    (["schedule.epochs=40", "schedule.warmup_epochs=0", "schedule.batch_size=2048"], 37_816, 760),
    # a warm-up: only the quantized epochs count
    (["schedule.epochs=40", "schedule.warmup_epochs=30", "schedule.steps_per_epoch=4"], 1000, 40),
    # max_steps cutting the quantized phase: 10 epochs of 4, 5 of warm-up, stop at step 30
    (["schedule.epochs=10", "schedule.warmup_epochs=5", "schedule.max_steps=30"], 1000, 10),
])
def test_auto_is_the_budget_over_the_planned_quantized_steps(overrides, n_train, steps):
    for budget in (8.0, 3.5):
        cfg = config(*overrides, f"model.latent_budget={budget}")
        assert cfg.model.latent_lr == "auto"  # the default
        plan = Schedule.of(cfg, n_train)
        assert plan.quantized_steps == steps
        assert plan.method_options(cfg)["latent_lr"] == pytest.approx(budget / steps, rel=1e-12)


@pytest.mark.parametrize("warmup", [0, 3])
def test_cosine_decay_runs_from_twice_the_step_to_zero_with_mean_one(warmup):
    cfg = config("schedule.epochs=13", f"schedule.warmup_epochs={warmup}", "schedule.steps_per_epoch=4")
    plan = Schedule.of(cfg, 1000)
    first = warmup * 4
    T = plan.quantized_steps
    assert T == (13 - warmup) * 4
    factors = [plan.latent_factor(first + t) for t in range(T)]
    assert factors[0] == 2.0 and plan.latent_factor(first + T // 2) == pytest.approx(1.0)
    assert 0 < factors[-1] < 0.01 and sum(factors) / T == pytest.approx(1 + 1 / T)  # the sampled cosine's mean
    assert plan.latent_factor(first + T + 5) == pytest.approx(0.0, abs=1e-12)  # past the plan: 0, never negative
    flat = Schedule.of(config("schedule.epochs=13", "schedule.warmup_epochs=0", "model.latent_decay=none"), 1000)
    assert {flat.latent_factor(s) for s in range(60)} == {1.0}


def test_a_number_sets_the_step_and_edge_plans_stay_finite():
    cfg = config("schedule.epochs=40", "schedule.warmup_epochs=0", "model.latent_lr=0.05")
    assert Schedule.of(cfg, 1000).method_options(cfg)["latent_lr"] == 0.05
    # max_steps ending inside the warm-up: the method is quantized at the end, never stepped
    cfg = config("schedule.epochs=10", "schedule.warmup_epochs=5", "schedule.max_steps=3", "model.latent_budget=6")
    plan = Schedule.of(cfg, 1000)
    assert plan.quantized_steps == 0 and plan.method_options(cfg)["latent_lr"] == 6.0
    fp = load_config(TrainConfig, [], ["model.method=fp", "model.bits=null"])
    assert Schedule.of(fp, 1000).quantized_steps == 0
    assert ModelConfig().latent_step(200) == pytest.approx(ModelConfig().latent_budget / 200)


@pytest.mark.parametrize("override, message", [
    ("model.latent_lr=fast", "model.latent_lr"),
    ("model.latent_lr=0", "model.latent_lr"),
    ("model.latent_lr=-0.01", "model.latent_lr"),
    ("model.latent_lr=.nan", "model.latent_lr"),
    ("model.latent_lr=.inf", "model.latent_lr"),
    ("model.latent_budget=0", "model.latent_budget"),
    ("model.latent_budget=-4", "model.latent_budget"),
    ("model.latent_budget=.nan", "model.latent_budget"),
    ("model.latent_budget=auto", "model.latent_budget"),
    ("model.latent_decay=linear", "model.latent_decay"),
])
def test_bad_values_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        config(override)
    assert "\n" not in str(info.value)
    # set on the dataclass directly, validate() refuses it too
    cfg = TrainConfig()
    key, _, value = override.partition("=")
    setattr(cfg.model, key.split(".")[1], {"fast": "fast", "auto": "auto", "linear": "linear", ".nan": math.nan,
                                          ".inf": math.inf}.get(value, None) or float(value))
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


SMALL = ["model.dim=8", "model.num_layers=2", "schedule.epochs=3", "schedule.warmup_epochs=0",
         "schedule.batch_size=128", "schedule.num_negatives=2", "schedule.eval_every=0", "progress=false",
         "eval.ks=[10]", "model.latent_budget=2"]


def test_the_one_process_trainer_trains_with_the_resolved_step_and_reports_it():
    data = clustered_interactions(n_users=60, n_items=40, seed=1)
    cfg = config(*SMALL)
    trainer = LocalTrainer(cfg, data)
    steps = 3 * trainer.steps_per_epoch
    assert steps > 3  # several steps an epoch, so a wrong count shows
    seen = []
    original = LocalTrainer.step

    def step(self, method, *args):  # the step each refinement took, as the trainer set it
        loss = original(self, method, *args)
        seen.append(method.latent_lr)
        return loss

    LocalTrainer.step = step
    try:
        result = trainer.run()
        constant = LocalTrainer(config(*SMALL, "model.latent_lr=0.07", "model.latent_decay=none"), data).run()
    finally:
        LocalTrainer.step = original
    assert result.latent_lr == pytest.approx(2 / steps)  # the mean step the run reports
    start = next(r for r in trainer.records if r["event"] == "start")
    assert start["latent_lr"] == pytest.approx(2 / steps) and start["latent_decay"] == "cosine"
    # cosine (the default): twice the mean step first, falling every step, mean about the resolved step
    assert len(seen) == 2 * steps and seen[0] == pytest.approx(4 / steps)
    assert all(a > b for a, b in zip(seen[:steps], seen[1:steps]))
    assert sum(seen[:steps]) / steps == pytest.approx(2 / steps * (1 + 1 / steps))
    # a number with no decay is what the method trains with at every step
    assert seen[steps:] == [0.07] * steps and constant.method.latent_lr == 0.07
    # other methods report no latent step
    lsq = load_config(TrainConfig, [], ["model.method=lsq", "model.bits=2", *SMALL])
    assert LocalTrainer(lsq, data).schedule.latent_lr is None


def test_summary_json_records_the_resolved_step(tmp_path):
    from gnaq_dist.api import train
    from gnaq_dist.demo import ingest_bundled

    uri = ingest_bundled(tmp_path / "lastfm", progress=False)
    out = tmp_path / "run"
    result = train(config(*SMALL, f"dataset={uri}", f"out={out}", "schedule.epochs=1"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["model"]["latent_lr"] == "auto"
    assert summary["latent_lr"] == pytest.approx(result.latent_lr) and result.latent_lr > 0


def scenario_resolved_step(rank: int, world: int) -> float:
    """The step the distributed trainer's schedule resolves on this rank (a method it trains:
    the options are the ones any method gets)."""
    from gnaq_dist.distributed.trainer import DistributedTrainer

    data = clustered_interactions(n_users=300, n_items=200, seed=1)
    cfg = load_config(TrainConfig, [], ["model.method=gnaq_static", "model.bits=2", *SMALL])
    trainer = DistributedTrainer(cfg, data)
    return trainer.schedule.method_options(cfg)["latent_lr"]


def test_every_distributed_rank_resolves_the_one_process_step():
    data = clustered_interactions(n_users=300, n_items=200, seed=1)
    cfg = load_config(TrainConfig, [], ["model.method=gnaq_static", "model.bits=2", *SMALL])
    local = LocalTrainer(cfg, data)
    want = 2 / (3 * local.steps_per_epoch)
    assert local.schedule.method_options(cfg)["latent_lr"] == pytest.approx(want)
    # each rank takes half the positives a step, but plans the same global steps
    assert run_ranks(scenario_resolved_step, 2, timeout=120) == [pytest.approx(want)] * 2


def test_a_resumed_run_takes_the_step_of_its_own_plan(tmp_path):
    """The step, like the Adam rate, is the running config's: a run resumed to more epochs
    divides by its longer plan, not the checkpoint's."""
    from gnaq_dist.train.local import train_local

    data = clustered_interactions(n_users=60, n_items=40, seed=1)
    over = [*SMALL, f"out={tmp_path / 'run'}", "checkpoint.every_epochs=1"]
    first = train_local(config(*over, "schedule.epochs=2"), data, checkpoints=True)
    spe = LocalTrainer(config(*SMALL), data).steps_per_epoch
    assert first.latent_lr == pytest.approx(2 / (2 * spe))
    again = train_local(config(*over, "schedule.epochs=4"), data, checkpoints=True)
    assert again.resumed_from is not None and again.resumed_from["epoch"] == 2
    assert again.latent_lr == pytest.approx(2 / (4 * spe))
    # the last step of the resumed run is on the 4-epoch curve: (1 + cos(pi (T-1)/T)) x the mean step
    T = 4 * spe
    assert again.method.latent_lr == pytest.approx(2 / T * (1 + math.cos(math.pi * (T - 1) / T)))
