"""GNAQ as the reference code runs it, against a case computed by hand: the forward (tanh of
the levels, propagation, score biases), the backward into levels and biases (no L2), the
re-assignment of every node's codes from the step's forward, and the per-epoch figures
(codes changed, layer-0 error) in metrics.jsonl."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gnaq_dist.config import load_config
from gnaq_dist.interactions import InteractionData
from gnaq_dist.quant import build_method
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.local import LocalTrainer

# Two users, three items; train edges u0-i0, u0-i1, u1-i1, u1-i2 (nodes: u0 u1 i0 i1 i2).
S2 = 1 / math.sqrt(2)
A_HAT = np.array([  # D^-1/2 A D^-1/2, degrees 2 2 1 2 1
    [0, 0, S2, 0.5, 0],
    [0, 0, 0, 0.5, S2],
    [S2, 0, 0, 0, 0],
    [0.5, 0.5, 0, 0, 0],
    [0, S2, 0, 0, 0],
])
LEVELS = np.array([[-0.6, -0.1, 0.2, 0.9], [-0.3, 0.0, 0.4, 0.5], [-1.0, -0.5, 0.5, 1.0],
                   [0.1, 0.2, 0.3, 0.4], [-0.2, 0.6, 0.7, 1.2]], dtype=np.float32)
CODES = np.array([[0, 3, 2], [1, 1, 3], [3, 0, 2], [2, 1, 0], [0, 3, 1]], dtype=np.uint8)
BIAS = np.array([0.05, -0.1, 0.3, -0.2, 0.1], dtype=np.float32)


def tiny_data() -> InteractionData:
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    return InteractionData(2, 3, i64(0, 0, 1, 1), i64(0, 1, 1, 2), i64(0, 1), i64(2, 0))


def tiny_config(method: str = "gnaq", **extra) -> TrainConfig:
    overrides = [f"model.method={method}", "model.bits=2", "model.dim=3", "model.num_layers=1",
                 "model.level_dtype=float32", "schedule.propagation=full", "schedule.epochs=1",
                 "schedule.warmup_epochs=0", "schedule.batch_size=1", "schedule.num_negatives=1",
                 "schedule.eval_every=0", "optim.l2=1.0", "optim.grad_clip=null", "progress=false",
                 "eval.ks=[1]"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(TrainConfig, [], overrides)


def hand_method():
    m = build_method("gnaq", 5, 3, 2, 1)
    with torch.no_grad():
        m.levels.copy_(torch.from_numpy(LEVELS))
        m.codes = torch.from_numpy(CODES)
        m.bias.copy_(torch.from_numpy(BIAS))
    return m


def by_hand():
    """x = tanh(c[q]); h = (x + A x) / 2; one positive (u0, i0) and one negative i2; the loss
    softplus(s_n - s_p) with s = <h_u, h_i> + b_u + b_i; its gradients in closed form."""
    x = np.tanh(np.take_along_axis(LEVELS, CODES.astype(np.int64), 1))
    h = (x + A_HAT @ x) / 2
    u, p, n = 0, 2, 4
    s_p = h[u] @ h[p] + BIAS[u] + BIAS[p]
    s_n = h[u] @ h[n] + BIAS[u] + BIAS[n]
    loss = math.log1p(math.exp(s_n - s_p))
    sig = 1 / (1 + math.exp(-(s_n - s_p)))
    g_h = np.zeros_like(h)
    g_h[u] = sig * (h[n] - h[p])
    g_h[p] = -sig * h[u]
    g_h[n] = sig * h[u]
    g_x = (g_h + A_HAT.T @ g_h) / 2  # dL/dx: the mean of layers 0 and 1
    g_levels = np.zeros_like(LEVELS)
    for i in range(5):
        for d in range(3):
            k = CODES[i, d]
            g_levels[i, k] += (1 - math.tanh(LEVELS[i, k]) ** 2) * g_x[i, d]
    g_bias = np.zeros(5)
    g_bias[p], g_bias[n] = -sig, sig  # b_u cancels between s_p and s_n
    return loss, h, g_levels, g_bias


def equal_width_bins(h: np.ndarray) -> np.ndarray:
    lo, hi = h.min(1, keepdims=True), h.max(1, keepdims=True)
    return np.clip(np.floor((h - lo) / (hi - lo) * 4), 0, 3).astype(np.uint8)


BATCH = (torch.tensor([0]), torch.tensor([0]), torch.tensor([[2]]))  # user 0, item 0, negative item 2


def test_forward_and_backward_match_the_hand_computed_case():
    trainer = LocalTrainer(tiny_config(), tiny_data())
    m = hand_method()
    loss, h, g_levels, g_bias = by_hand()
    got_loss, _, final, _ = trainer.backward(m, *BATCH)
    assert got_loss == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(final.numpy(), h, rtol=1e-5, atol=1e-7)
    # optim.l2 = 1 would add x to every touched row's gradient: gnaq takes no L2 (the reference's).
    np.testing.assert_allclose(m.levels.grad.numpy(), g_levels, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m.bias.grad.numpy(), g_bias, rtol=1e-5, atol=1e-7)
    assert m.levels.grad[1].abs().sum() > 0  # u1 is in no triple: its levels learn through the graph


def test_gnaq_static_is_the_frozen_form_with_l2_and_no_bias():
    trainer = LocalTrainer(tiny_config("gnaq_static"), tiny_data())
    m = build_method("gnaq_static", 5, 3, 2, 1)
    assert m.phi_name == "identity" and m.bias is None and m.uses_l2 and trainer.config.model.refine_steps == 0
    with torch.no_grad():
        m.levels.copy_(torch.from_numpy(LEVELS))
        m.codes = torch.from_numpy(CODES)
    x = np.take_along_axis(LEVELS, CODES.astype(np.int64), 1)
    h = (x + A_HAT @ x) / 2
    sig = 1 / (1 + math.exp(-(h[0] @ h[4] - h[0] @ h[2])))
    g_h = np.zeros_like(h)
    g_h[0], g_h[2], g_h[4] = sig * (h[4] - h[2]), -sig * h[0], sig * h[0]
    g_x = (g_h + A_HAT.T @ g_h) / 2
    g_x[[0, 2, 4]] += 1.0 * x[[0, 2, 4]]  # L2 (optim.l2 = 1) on the three rows, once each, over B = 1
    want = np.zeros_like(LEVELS)
    for i in range(5):
        for d in range(3):
            want[i, CODES[i, d]] += g_x[i, d]
    trainer.backward(m, *BATCH)
    np.testing.assert_allclose(m.levels.grad.numpy(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("every", [1, 2])
def test_a_step_reassigns_every_nodes_codes_from_its_forward(every):
    """After the optimizer step, every node's codes (in the batch or not) are the equal-width
    bins of the final embedding that step's forward computed; with refine_every 2, only after
    the second step."""
    trainer = LocalTrainer(tiny_config(**{"model.refine_every": every}), tiny_data())
    m = hand_method()
    _, h, _, _ = by_hand()
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    trainer.step(m, opt, *BATCH)
    if every == 2:
        np.testing.assert_array_equal(m.codes.numpy(), CODES)  # not yet
        x = torch.tanh(torch.gather(m.levels.detach(), 1, m.codes.long()))
        h = ((x + torch.from_numpy(A_HAT).float() @ x) / 2).numpy()  # the second step's forward
        trainer.step(m, opt, *BATCH)
    want = equal_width_bins(h)
    np.testing.assert_array_equal(m.codes.numpy(), want)
    assert not np.array_equal(want, CODES)  # the case does move codes, in nodes outside the batch too
    assert not np.array_equal(want[[1, 3]], CODES[[1, 3]])


@pytest.fixture(scope="module")
def metric_runs(tmp_path_factory):
    data = clustered_interactions(n_users=150, n_items=100, seed=4)
    out = {}
    for method, bits, extra in [("gnaq", 2, {}), ("gnaq_static", 2, {}), ("lsq", 2, {}), ("fp", None, {}),
                                ("gnaq", 2, {"model.level_dtype": "float32"})]:
        path = tmp_path_factory.mktemp("m") / "metrics.jsonl"
        cfg = load_config(TrainConfig, [], [
            f"model.method={method}", f"model.bits={'null' if bits is None else bits}", "model.dim=8",
            "model.num_layers=2", "schedule.epochs=4", "schedule.warmup_epochs=2", "schedule.batch_size=256",
            "schedule.num_negatives=2", "schedule.eval_every=0", "progress=false", "eval.ks=[10]",
        ] + [f"{k}={v}" for k, v in extra.items()])
        trainer = LocalTrainer(cfg, data)
        from gnaq_dist.runlog import RunLog

        trainer.log = RunLog(str(path))
        result = trainer.run()
        records = [json.loads(line) for line in path.read_text().splitlines()]
        out[(method, extra.get("model.level_dtype", "float16"))] = (
            [r for r in records if r["event"] == "epoch"], result)
    return out


def test_metrics_record_the_share_of_changed_codes(metric_runs):
    epochs, _ = metric_runs[("gnaq", "float16")]
    assert all("codes_changed" not in r for r in epochs if r["phase"] == "fp")
    quantized = [r for r in epochs if r["phase"] == "quantized"]
    assert len(quantized) == 2
    # Refining every step from the propagated rows moves codes; the frozen form moves none.
    assert all(0 < r["codes_changed"] <= 1 for r in quantized)
    static = [r for r in metric_runs[("gnaq_static", "float16")][0] if r["phase"] == "quantized"]
    assert [r["codes_changed"] for r in static] == [0.0, 0.0]
    assert all("codes_changed" not in r for r in metric_runs[("lsq", "float16")][0])
    assert all("codes_changed" not in r and "layer0_error" not in r for r in metric_runs[("fp", "float16")][0])


def test_metrics_record_the_layer0_error(metric_runs):
    epochs, result = metric_runs[("lsq", "float16")]
    last = [r for r in epochs if r["phase"] == "quantized"][-1]
    w = result.method.latent.detach()
    want = float((w - result.method.embed(None).detach()).abs().mean() / w.abs().mean())
    assert last["layer0_error"] == pytest.approx(want, rel=1e-5)
    assert 0.05 < want < 1
    # GNAQ has no fp table: its error is that of storing the levels (fp16 vs fp32).
    gnaq16 = [r["layer0_error"] for r in metric_runs[("gnaq", "float16")][0] if r["phase"] == "quantized"]
    gnaq32 = [r["layer0_error"] for r in metric_runs[("gnaq", "float32")][0] if r["phase"] == "quantized"]
    assert all(0 < e < 1e-3 for e in gnaq16) and gnaq32 == [0.0, 0.0]
