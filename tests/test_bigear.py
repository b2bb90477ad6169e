"""BiGeaR as its authors' code runs it, against a case worked by hand: the forward (fp
propagation, per-layer binarization, layer weights), the backward (clamped Gaussian), the
teacher's ranking and the distillation term (value and gradient); then the method in the
one-process trainer, and its one-line refusal by the distributed one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gnaq_dist.cli import main as gnaq_main
from gnaq_dist.config import from_dict, load_config
from gnaq_dist.errors import ConfigError, GnaqInputError
from gnaq_dist.graph import build_graph_from_arrays
from gnaq_dist.propagation import propagate_full
from gnaq_dist.quant import build_method
from gnaq_dist.quant.bigear import distillation_into, teacher_ranks
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.local import LocalTrainer

# Two users, two items, edges u0-i0 and u1-i1: every degree is 1, so A_hat swaps partners and
# H^1 of u0 is i0's row, of i0 u0's row, and so on. d = 2, L = 1, layer weights 1/2 and 1.
W = torch.tensor([[1.0, 0.5],     # u0
                  [-1.0, -2.0],   # u1
                  [0.5, 1.5],     # i0
                  [-1.0, 0.5]])   # i1
# Q(h) = sign(h) mean|h| per row. Layer 0: u0 0.75, u1 1.5, i0 1.0, i1 0.75; layer 1 (the
# partner's row): u0 [0.5, 1.5] -> 1.0, u1 [-1, 0.5] -> 0.75, i0 [1, 0.5] -> 0.75, i1 [-1, -2] -> 1.5.
FINAL = torch.tensor([[0.375, 0.375, 1.0, 1.0],
                      [-0.75, -0.75, -0.75, 0.75],
                      [0.5, 0.5, 0.75, 0.75],
                      [-0.375, 0.375, -1.5, -1.5]])
# Teacher = W. Layer 0: u0.i0 = 1.25, u0.i1 = -0.75; u1.i0 = -3.5, u1.i1 = 0.
# Layer 1: u0 [0.5, 1.5] . i0 [1, 0.5] = 1.25, . i1 [-1, -2] = -3.5; u1 [-1, 0.5]: -0.75 and 0.
RANKS = [[[0, 1], [0, 1]], [[1, 0], [1, 0]]]  # (user, layer, rank) -> item


def pair_graph():
    return build_graph_from_arrays(2, 2, np.array([0, 1]), np.array([0, 1]))


def hand_method(**opts):
    m = build_method("bigear", 4, 2, 1, 1, graph=pair_graph(), top_r=2, **opts)
    m.init_from_full_precision(W)
    return m


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_forward_propagates_in_full_precision_and_binarizes_each_layer_for_scoring():
    m = hand_method()
    layers = propagate_full(pair_graph(), m.embed(None), 1, m.layer_fn)
    torch.testing.assert_close(layers[1], W[[2, 3, 0, 1]])  # fp rows propagate, not binarized ones
    torch.testing.assert_close(m.combine(layers), FINAL)
    # What inference scores is the same: the packed table's weighted groups.
    table = m.pack(torch.float32)
    assert table.groups == 2 and table.group_weights == [0.5, 1.0] and not table.needs_propagation
    weighted = table.dequantize().reshape(4, 2, 2) * np.array([0.5, 1.0], dtype=np.float32)[None, :, None]
    np.testing.assert_allclose(weighted.reshape(4, 4), FINAL.numpy())


def test_backward_is_their_clamped_gaussian_without_a_scale_term():
    m = hand_method()
    m.combine(propagate_full(pair_graph(), m.embed(None), 1)).sum().backward()
    c = 1 / math.sqrt(math.pi)  # a = 1
    # Row u0 is [1, 0.5] at layer 0 (weight 1/2) and, through the edge to i0, i0's layer-1 row
    # (the same values, weight 1): 1.5 * c * exp(-h^2) element-wise.
    torch.testing.assert_close(m.weight.grad[0], torch.tensor([1.5 * c * math.exp(-1.0), 1.5 * c * math.exp(-0.25)]))
    # i1 is [-1, 0.5]; u1's layer-1 row is the same.
    torch.testing.assert_close(m.weight.grad[3], torch.tensor([1.5 * c * math.exp(-1.0), 1.5 * c * math.exp(-0.25)]))
    # The clamp: a = 10 makes the factor 10/sqrt(pi) > 1 at h = 0 and about 1e-43 at h = 1.
    h = torch.tensor([[0.0, 1.0]], requires_grad=True)
    sharp = build_method("bigear", 1, 2, 1, 0, gaussian_a=10.0)
    sharp.combine([h]).sum().backward()
    torch.testing.assert_close(h.grad, torch.tensor([[1.0, 1e-8]]))


def test_teacher_ranks_every_layer_over_all_items():
    m = hand_method()
    assert m.ranks().tolist() == RANKS
    layers = propagate_full(pair_graph(), W, 1)
    assert teacher_ranks(layers, 2, 5).shape == (2, 2, 2)  # R is cut to the item count


@pytest.mark.parametrize("fused", [True, False], ids=["numba", "torch"])
def test_distillation_value_and_gradient_by_hand(fused):
    users = torch.tensor([0, 0, 1])  # B = 3: u0 weighs 2/(B R (L+1)) = 1/6, u1 1/12
    grad = torch.zeros(4, 4)
    loss = distillation_into(FINAL, users, torch.tensor(RANKS, dtype=torch.int32), 2, grad, fused=fused)
    w0, w1 = math.exp(-0.1), math.exp(-0.2)
    # Student scores (layer, user, rank): layer 0: u0 i0 0.375, u0 i1 0, u1 i1 0, u1 i0 -0.75;
    # layer 1: u0 i0 1.5, u0 i1 -3, u1 i1 0, u1 i0 0.
    want = (1 / 6) * (w0 * sp(-0.375) + w1 * sp(0.0) + w0 * sp(-1.5) + w1 * sp(3.0)) \
        + (1 / 12) * (w0 * sp(0.0) + w1 * sp(0.75) + w0 * sp(0.0) + w1 * sp(0.0))
    assert loss == pytest.approx(want, rel=1e-6)
    # d/ds = -coef w_r sigmoid(-s); u0's layer-1 slice: i0's [0.75, 0.75] and i1's [-1.5, -1.5].
    g_u0_l1 = -(1 / 6) * (w0 * sig(-1.5) * 0.75 + w1 * sig(3.0) * -1.5)
    torch.testing.assert_close(grad[0, 2:], torch.tensor([g_u0_l1, g_u0_l1]))
    # i1's layer-0 slice: from u0 (rank 1, s 0, row [0.375, 0.375]) and u1 (rank 0, s 0, [-0.75, -0.75]).
    g_i1_l0 = -(1 / 6) * w1 * 0.5 * 0.375 - (1 / 12) * w0 * 0.5 * -0.75
    torch.testing.assert_close(grad[3, :2], torch.tensor([g_i1_l0, g_i1_l0]))
    # The whole gradient against autograd of the same sum, written out term by term.
    f = FINAL.clone().requires_grad_(True)
    terms = []
    for b in users.tolist():
        for l in range(2):
            for r, item in enumerate(RANKS[b][l]):
                s = f[b, 2 * l:2 * l + 2] @ f[2 + item, 2 * l:2 * l + 2]
                terms.append([w0, w1][r] * torch.nn.functional.softplus(-s))
    (torch.stack(terms).sum() / (3 * 2 * 2)).backward()
    torch.testing.assert_close(grad, f.grad)
    # Chunks of users change nothing.
    again = torch.zeros(4, 4)
    assert distillation_into(FINAL, users, torch.tensor(RANKS, dtype=torch.int32), 2, again, chunk=1,
                             fused=fused) == pytest.approx(loss)
    torch.testing.assert_close(again, grad)


def test_extra_loss_needs_every_node_and_other_methods_add_nothing():
    m = hand_method()
    with pytest.raises(GnaqInputError, match="propagation must be full"):
        m.extra_loss(FINAL[:2], torch.tensor([0]), torch.zeros(2, 4))
    lsq = build_method("lsq", 4, 2, 2, 1)
    grad = torch.zeros(4, 4)
    assert lsq.extra_loss(FINAL, torch.tensor([0]), grad) == 0.0 and not grad.any()


def small_config(**overrides) -> TrainConfig:
    sets = {"model.method": "bigear", "model.bits": 1, "model.dim": 8, "model.num_layers": 2,
            "schedule.epochs": 4, "schedule.warmup_epochs": 2, "schedule.batch_size": 256, "schedule.eval_every": 0,
            "eval.ks": [10, 20], "optim.lr": 0.02, "progress": False, "threads": 1, **overrides}
    return load_config(TrainConfig, [], [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def test_one_process_trainer_distills_from_the_warm_up_model():
    data = clustered_interactions(n_users=60, n_items=40, per_user=8, seed=1)
    trainer = LocalTrainer(small_config(), data)
    result = trainer.run(capture_epoch=2)
    m = result.method
    assert m.name == "bigear" and result.phase_epochs["fp"] == 2 and result.phase_epochs["quantized"] == 2
    # The teacher is the fp table the quantized phase started from; the student moved away.
    torch.testing.assert_close(m.teacher, result.warm_start.weight)
    assert not torch.equal(m.weight.detach(), m.teacher)
    assert m.ranks().shape == (60, 3, 40)  # R = min(100, items)
    # The distillation reaches the weights: a step with it differs from one without.
    users = torch.arange(10)
    final = m.combine(propagate_full(trainer.graph, m.embed(None), 2))
    grad = torch.zeros_like(final)
    assert m.extra_loss(final, users, grad) > 0 and grad.abs().sum() > 0
    assert result.storage["bytes_per_node"] == 3 * 8 / 8 + 3 * 2 * 2  # 3 layers of 8 bits, fp16 +-alpha each
    assert all(np.isfinite(v) for v in result.metrics.values())


def test_sampled_propagation_and_distributed_runs_are_refused():
    with pytest.raises(ConfigError, match="bigear needs schedule.propagation=full"):
        small_config(**{"schedule.propagation": "sampled"}).validate()
    with pytest.raises(ConfigError, match="cannot train distributed"):
        small_config().check_distributed()
    small_config(**{"model.method": "lsq", "model.bits": 2}).check_distributed()  # others pass


def test_gnaq_train_with_workers_refuses_bigear_in_one_line_before_ray(tmp_path, capsys):
    from gnaq_dist.ingest import IngestConfig, ingest
    from gnaq_dist.synthetic_logs import LogSpec, generate_log

    generate_log(tmp_path / "log", LogSpec(users=50, items=30, rows=600, seed=2), progress=False)
    ingest(str(tmp_path / "log"), str(tmp_path / "ds"), from_dict(IngestConfig, {"progress": False}))
    out = tmp_path / "run"
    rc = gnaq_main(["train", "--dataset", str(tmp_path / "ds"), "--out", str(out), "--method", "bigear",
                    "--bits", "1", "--workers", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "model.method=bigear cannot train distributed" in err, err
    assert not (out / "ray").exists()
    import ray

    assert not ray.is_initialized()
