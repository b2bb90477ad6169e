"""The shared schedule: steps per epoch decide the batch, the end-of-run rules both trainers follow, and
the wall-clock budget ends a run (in one process and on 2 gloo ranks that must agree when to stop)."""

from __future__ import annotations

import pytest

from distributed_utils import run_ranks
from gnaq_dist.errors import ConfigError
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.local import LocalTrainer
from gnaq_dist.train.schedule import PhaseTimes, Schedule
from test_chunked_loss import small_config, small_data


def test_steps_per_epoch_sets_the_batch_and_the_schedule():
    cfg = small_config("gnaq", 2, **{"schedule.steps_per_epoch": 4, "schedule.batch_size": "null",
                                     "schedule.epochs": 3, "schedule.warmup_epochs": 1})
    plan = Schedule.of(cfg, 1001)
    assert (plan.batch_size, plan.steps_per_epoch, plan.total_steps) == (251, 4, 12)
    assert plan.quantize_at(2) and not plan.quantize_at(1)
    assert Schedule.of(small_config("fp", None), 1001).batch_size == 400  # a batch size, when set, wins
    trainer = LocalTrainer(cfg, small_data())
    n_train = small_data().n_train
    assert trainer.steps_per_epoch == 4 and trainer.schedule.batch_size == -(-n_train // 4)
    result = trainer.run()
    assert result.phase_epochs == {"fp": 1, "quantized": 2}


def test_the_end_of_run_rules_both_trainers_follow():
    plan = Schedule.of(small_config("gnaq", 2, **{"schedule.steps_per_epoch": 4, "schedule.batch_size": "null",
                                                  "schedule.epochs": 3, "schedule.warmup_epochs": 1,
                                                  "schedule.max_steps": 10}), 1001)
    assert plan.total_steps == 10 and not plan.steps_done(9) and plan.steps_done(10)
    assert plan.last_epoch(3, 9, False) and plan.last_epoch(2, 10, False) and plan.last_epoch(1, 4, True)
    assert not plan.last_epoch(2, 8, False)
    # a quantized run whose budget ended in the warm-up is quantized, then evaluated; an fp run is not
    assert plan.quantize_at_end("fp") and not plan.quantize_at_end("quantized")
    assert not Schedule.of(small_config("fp", None), 1001).quantize_at_end("fp")
    assert Schedule.evaluate_at_end({}, True) and Schedule.evaluate_at_end({"recall@20": 0.1}, False)
    assert not Schedule.evaluate_at_end({"recall@20": 0.1}, True)


def test_phase_times_add_up_the_training_phases_only():
    times = PhaseTimes()
    times.add_epoch("fp", 2.0, 4)
    times.add_epoch("quantized", 1.0, 2)
    times.seconds["eval"] += 5.0
    assert times.train_seconds() == 3.0 and times.seconds_per_epoch() == 1.5 and times.seconds_per_step() == 0.5
    assert PhaseTimes().seconds_per_epoch() == 0.0


@pytest.mark.parametrize("key,value", [("schedule.steps_per_epoch", 0), ("schedule.loss_chunk", 0),
                                       ("schedule.max_minutes", 0), ("schedule.max_minutes", -1)])
def test_bad_schedule_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        small_config("fp", None, **{key: value}).validate()


def test_cosine_decay_runs_each_phase_down_its_own_curve():
    decayed = {"schedule.epochs": 6, "schedule.warmup_epochs": 3, "optim.lr_decay": "cosine", "optim.lr_final": 0.1}
    plan = Schedule.of(small_config("gnaq", 2, **decayed), 1001)
    assert [round(plan.lr_factor(e), 6) for e in range(1, 7)] == [1.0, 0.55, 0.1, 1.0, 0.55, 0.1]
    fp = Schedule.of(small_config("fp", None, **decayed), 1001)  # one phase: all six epochs
    assert fp.lr_factor(1) == 1.0 and fp.lr_factor(6) == pytest.approx(0.1) and 0.1 < fp.lr_factor(4) < 0.55
    plain = Schedule.of(small_config("gnaq", 2, **{"schedule.epochs": 6, "schedule.warmup_epochs": 3}), 1001)
    assert {plain.lr_factor(e) for e in range(1, 7)} == {1.0}


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_a_final_rate_outside_zero_to_one_is_refused(value):
    with pytest.raises(ConfigError, match="optim.lr_final"):
        small_config("fp", None, **{"optim.lr_decay": "cosine", "optim.lr_final": value}).validate()


def expected_rates(lr: float, quant_lr: float) -> list[float]:
    return [lr, lr * 0.2, quant_lr, quant_lr * 0.2]


DECAY = {"schedule.epochs": 4, "schedule.warmup_epochs": 2, "optim.lr_decay": "cosine", "optim.lr_final": 0.2,
         "optim.lr": 0.05, "optim.quant_lr": 0.01}


def test_the_one_process_trainer_trains_each_epoch_at_its_decayed_rate():
    trainer = LocalTrainer(small_config("gnaq", 2, **DECAY), small_data())
    trainer.run()
    rates = [r["lr"] for r in trainer.records if r["event"] == "epoch"]
    assert rates == pytest.approx(expected_rates(0.05, 0.01))


def scenario_decay(rank: int, world: int) -> dict:
    from gnaq_dist.distributed.trainer import DistributedTrainer

    trainer = DistributedTrainer(small_config("gnaq", 2, **DECAY, **{"schedule.propagation": "full"}), small_data())
    out = trainer.run()
    return {"rates": [h["lr"] for h in out["history"] if h["event"] == "epoch"], "last": trainer.shard.optimizer.lr}


def test_every_rank_trains_each_epoch_at_its_decayed_rate():
    for r in run_ranks(scenario_decay, 2, timeout=180):
        assert r["rates"] == pytest.approx(expected_rates(0.05, 0.01))
        assert r["last"] == pytest.approx(0.01 * 0.2)  # what the optimizer stepped with in the last epoch


def test_a_time_limit_ends_training_then_evaluates_the_quantized_table():
    cfg = small_config("gnaq", 2, **{"schedule.epochs": 10_000, "schedule.warmup_epochs": 1,
                                     "schedule.max_minutes": 0.05})
    result = LocalTrainer(cfg, small_data()).run()
    epochs = result.phase_epochs["fp"] + result.phase_epochs["quantized"]
    assert 1 < epochs < 10_000
    assert 1.5 <= result.phase_seconds["fp"] + result.phase_seconds["quantized"] < 3.0 + 5.0
    last = result.history[-1]
    assert last["phase"] == "quantized" and last["recall@10"] == result.metrics["recall@10"] > 0


def test_a_time_limit_inside_the_warm_up_still_ends_with_a_quantized_table():
    cfg = small_config("lsq", 2, **{"schedule.epochs": 10_000, "schedule.warmup_epochs": 9_000,
                                    "schedule.max_minutes": 0.01})
    result = LocalTrainer(cfg, small_data()).run()
    assert result.phase_epochs["quantized"] == 0 and result.history[-1]["phase"] == "quantized"
    assert result.storage["compression_ratio"] > 1


def scenario_time_limit(rank: int, world: int, tmp: str) -> dict:
    """Rank 1 sleeps in every step, so the ranks' clocks disagree; both must stop together."""
    import time

    from gnaq_dist.distributed.trainer import DistributedTrainer

    cfg = small_config("gnaq", 2, **{"schedule.epochs": 10_000, "schedule.warmup_epochs": 2,
                                     "schedule.max_minutes": 0.1, "checkpoint.every_epochs": 1000,
                                     "checkpoint.dir": tmp, "schedule.propagation": "full"})
    trainer = DistributedTrainer(cfg, small_data())
    if rank == 1:
        original = trainer.step

        def slow_step(*args):
            time.sleep(0.01)
            return original(*args)

        trainer.step = slow_step
    return trainer.run()


@pytest.mark.slow
def test_two_ranks_agree_on_the_time_limit_and_write_the_final_checkpoint(tmp_path):
    r0, r1 = run_ranks(scenario_time_limit, 2, str(tmp_path), timeout=180)
    assert r0["steps"] == r1["steps"] > 0 and r0["metrics"] == r1["metrics"]
    assert r0["checkpoint"] and r0["checkpoint"] == r1["checkpoint"]
    assert r0["history"][-1]["event"] in ("checkpoint", "end")
    evals = [h for h in r0["history"] if h.get("event") == "eval"]
    assert evals[-1]["step"] == r0["steps"] and evals[-1]["phase"] == "quantized"  # even if the budget ended in the warm-up
