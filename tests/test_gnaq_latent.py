"""``gnaq_lat``: GNAQ trained quantized from the first step with a low-precision integer latent.

Forward (codes = equal-width bins of the latent row, values = the node's levels), backward
(the levels' gather gradient; dL/dx handed to the latent), the latent update (row-wise
normalised, unbiased stochastic rounding, re-binning that keeps the codes), what the method
holds (no fp32 (N, d) table, no Adam state of that size), its bytes per node, and a run in
the one-process trainer from scratch (the distributed loop: tests/test_gnaq_latent_distributed.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gnaq_dist.config import load_config
from gnaq_dist.errors import ConfigError, GnaqInputError
from gnaq_dist.methods import GNAQ_VARIANTS, is_gnaq, is_packed_gnaq
from gnaq_dist.quant import GNAQLatent, build_method
from gnaq_dist.quant.gnaq import equal_width_codes
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.local import LocalTrainer


def fresh(n=6, d=8, **kw) -> GNAQLatent:
    """An 8-bit latent (the variant's own is 4): integer steps small against its range."""
    torch.manual_seed(0)
    kw.setdefault("latent_bits", 8)
    return build_method("gnaq_lat", n, d, 2, 1, **kw)


def test_registered_as_a_gnaq_variant_of_its_own():
    spec = GNAQ_VARIANTS["gnaq_lat"]
    assert spec.latent_bits == 4 and spec.refine_every == 1 and not spec.straight_through
    assert is_gnaq("gnaq_lat") and not is_packed_gnaq("gnaq_lat")
    # the reference form and the frozen form are untouched
    assert GNAQ_VARIANTS["gnaq"].latent_bits == 0 and GNAQ_VARIANTS["gnaq_static"].latent_bits == 0
    m = build_method("gnaq_lat", 6, 8, 2, 1)
    assert isinstance(m, GNAQLatent) and m.latent_bits == 4 and m.latent_bytes_per_node == 4.0
    assert m.latent_lr == 0.01
    assert build_method("gnaq_lat", 6, 8, 2, 1, latent_bits=8).latent_bytes_per_node == 8.0
    m4 = build_method("gnaq_lat", 6, 8, 2, 1, latent_bits=4)
    assert m4.latent_bytes_per_node == 4.0 and tuple(m4.latent_packed.shape) == (6, 4)  # held packed
    assert int(m4.latent_int.max()) == 15
    with pytest.raises(GnaqInputError):
        build_method("gnaq_lat", 6, 8, 2, 1, latent_bits=3)
    with pytest.raises(GnaqInputError):
        build_method("gnaq_lat", 6, 8, 4, 1, latent_bits=2)  # latent narrower than the codes


def test_forward_is_the_levels_gathered_by_the_latents_bins():
    m = fresh()
    u = m.latent_int.to(torch.float32)
    q = equal_width_codes(u, 4).long()
    want = torch.gather(m.levels.detach(), 1, q)
    torch.testing.assert_close(m.embed(None).detach(), want)
    ids = torch.tensor([4, 1])
    torch.testing.assert_close(m.embed(ids).detach(), want[ids])
    # init stretches every row onto the full integer range
    assert int(m.latent_int.amin(1).max()) == 0 and int(m.latent_int.amax(1).min()) == 255
    # the packed table (what evaluation and export read) decodes to the same rows
    np.testing.assert_allclose(m.pack(torch.float32).dequantize(), want.numpy(), rtol=0, atol=0)


def test_backward_reaches_the_levels_through_the_codes_and_hands_dx_to_the_latent():
    m = fresh()
    g = torch.randn(6, 8)
    (m.embed(None) * g).sum().backward()
    q = m._codes_of(None).long()
    want = torch.zeros(6, 4).scatter_add_(1, q, g)  # phi = identity: dL/dc_k = sum_{d: q_d = k} g_d
    torch.testing.assert_close(m.levels.grad, want)
    assert len(m._pending) == 1 and m._pending[0][0] is None
    torch.testing.assert_close(m._pending[0][1], g)


def test_update_moves_the_latent_against_the_gradient_unbiased():
    n, d = 4000, 8
    m = fresh(n, d, latent_lr=0.3 / 255)  # 0.3 of an integer step for a gradient of the row's RMS
    u = torch.full((n, d), 100, dtype=torch.uint8)  # every row spans 0..255 (no re-binning), interior at 100
    u[:, 0] = 0
    u[:, 1] = 255
    m.latent_int = u
    g = torch.ones(n, d)
    g[:, :2] = 0.0  # the two end values stay put
    m._pending = [(None, g)]
    before = m.latent_int.clone()
    m.refine(None, None)
    moved = m.latent_int.to(torch.float32) - before.to(torch.float32)
    assert set(moved[:, 2:].unique().tolist()) <= {-1.0, 0.0}
    # v_hat = mean g^2 = 6/8 after one step (bias-corrected): step = 0.3 / sqrt(0.75) integer units
    want = -0.3 / np.sqrt(0.75)
    assert float(moved[:, 2:].mean()) == pytest.approx(want, abs=0.01)
    assert float(moved[:, :2].abs().sum()) == 0
    assert m._pending == []  # consumed
    after = m.latent_packed.clone()
    m.refine(None, None)  # nothing pending: a no-op
    assert torch.equal(m.latent_packed, after)


def test_rows_update_only_the_rows_of_a_partial_forward():
    m = fresh(latent_lr=0.05)
    before = m.latent_int.clone()
    ids = torch.tensor([2, 5])
    (m.embed(ids) * torch.randn(2, 8) * 10).sum().backward()
    m.refine(ids, None)
    changed = (m.latent_int != before).any(1)
    assert changed[[2, 5]].all() and not changed[[0, 1, 3, 4]].any()


def test_rebinning_restores_the_range_and_keeps_the_codes():
    m = fresh()
    u = torch.tensor([[40.0, 50, 60, 70, 80, 90, 100, 110]])
    before = equal_width_codes(u, 4)
    out = m._rebin(u)
    assert float(out.min()) == 0 and float(out.max()) == 255
    torch.testing.assert_close(equal_width_codes(out, 4), before)


def test_no_fp32_table_or_adam_state_of_table_size():
    data = clustered_interactions(n_users=60, n_items=40, seed=1)
    cfg = load_config(TrainConfig, [], [
        "model.method=gnaq_lat", "model.bits=2", "model.dim=16", "model.num_layers=2",
        "schedule.epochs=2", "schedule.warmup_epochs=0", "schedule.batch_size=128", "schedule.num_negatives=2",
        "schedule.eval_every=0", "progress=false", "eval.ks=[10]"])
    trainer = LocalTrainer(cfg, data)
    result = trainer.run()
    m = result.method
    N, d = data.n_nodes, 16
    for name, t in list(m.state_dict().items()):
        if t.dim() == 2 and tuple(t.shape) == (N, d):
            assert t.dtype == torch.uint8, name
    opt = trainer._optimizer(m, 0.01)
    assert all(p.shape[-1] != d for p in opt.param_groups[0]["params"])  # levels (N, 4) only
    # bytes per node: codes 16*2/8 = 4, fp16 levels 4*2 = 8, the 4-bit latent 8
    assert tuple(m.latent_packed.shape) == (N, 8)
    assert result.storage["latent_bytes_per_node"] == 8.0
    assert result.storage["served_bytes_per_node"] == 12.0
    assert result.storage["bytes_per_node"] == 20.0
    assert result.storage["compression_ratio"] == pytest.approx(64 / 20)
    assert 0 <= result.metrics["recall@10"] <= 1


def test_learns_from_scratch_where_frozen_codes_cannot():
    """Quantized from the first step on a small clustered log: the latent moves the codes
    (codes_changed > 0) and training reaches a lower loss than gnaq_static, whose codes stay
    where the random start put them."""
    data = clustered_interactions(n_users=200, n_items=120, seed=3)
    losses = {}
    for method in ("gnaq_lat", "gnaq_static"):
        cfg = load_config(TrainConfig, [], [
            f"model.method={method}", "model.bits=2", "model.dim=16", "model.num_layers=2", "seed=0",
            "schedule.epochs=12", "schedule.warmup_epochs=0", "schedule.batch_size=512",
            "schedule.num_negatives=2", "schedule.eval_every=0", "progress=false", "eval.ks=[10]",
            "optim.quant_lr=0.01"])
        trainer = LocalTrainer(cfg, data)
        trainer.run()
        epochs = [r for r in trainer.records if r["event"] == "epoch"]
        losses[method] = epochs[-1]["loss"]
        if method == "gnaq_lat":
            assert all(r["codes_changed"] > 0 for r in epochs)
    assert losses["gnaq_lat"] < losses["gnaq_static"]


def test_config_checks_and_the_distributed_loop_takes_it():
    cfg = load_config(TrainConfig, [], ["model.method=gnaq_lat", "model.bits=2"])
    cfg.check_distributed()  # trained distributed too (tests/test_gnaq_latent_distributed.py)
    with pytest.raises(ConfigError, match="latent_bits"):
        load_config(TrainConfig, [], ["model.method=gnaq_lat", "model.bits=4", "model.latent_bits=2"]).validate()
    with pytest.raises(ConfigError, match="refine_every"):
        load_config(TrainConfig, [], ["model.method=gnaq_lat", "model.refine_every=0"]).validate()


def test_checkpoint_rows_round_trip_and_a_run_resumes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gnaq_dist import checkpoint as ckpt
    from gnaq_dist.train.local import train_local

    m = fresh(latent_lr=0.05)
    (m.embed(None) * torch.randn(6, 8)).sum().backward()
    m.refine(None, None)
    table = pq.read_table(pa.BufferReader(ckpt.parquet_bytes(ckpt.shard_table(m, np.arange(6)))))
    other = fresh()
    ckpt.load_rows(other, table)
    assert torch.equal(other.latent_packed, m.latent_packed) and torch.equal(other.grad_sq, m.grad_sq)
    torch.testing.assert_close(other.levels, m.levels)

    data = clustered_interactions(n_users=60, n_items=40, seed=1)
    over = ["model.method=gnaq_lat", "model.bits=2", "model.dim=8", "model.num_layers=2", "model.latent_bits=8",
            "schedule.warmup_epochs=0", "schedule.batch_size=128", "schedule.num_negatives=2",
            "schedule.eval_every=0", "progress=false", "eval.ks=[10]", f"out={tmp_path / 'run'}",
            "checkpoint.every_epochs=1"]
    first = train_local(load_config(TrainConfig, [], over + ["schedule.epochs=2"]), data, checkpoints=True)
    assert int(first.method.latent_int.max()) == 255  # the 8-bit latent asked for, not the variant's 4
    again = train_local(load_config(TrainConfig, [], over + ["schedule.epochs=3"]), data, checkpoints=True)
    assert again.resumed_from is not None and again.resumed_from["epoch"] == 2
    assert again.method.latent_bits == 8 and int(again.method.latent_int.max()) == 255


def test_load_packed_restores_levels_and_codes():
    m = fresh(latent_bits=4)
    with torch.no_grad():
        m.levels.add_(torch.randn_like(m.levels) * 0.01)
    table = m.pack(torch.float32)
    other = fresh(latent_bits=4)
    other.load_packed(table)
    torch.testing.assert_close(other.embed(None).detach(), m.embed(None).detach())
    assert torch.equal(other.codes, m.codes)
    assert m.packed_codes.numel() == 0  # no separate code table is held: the codes are the latent's bins
