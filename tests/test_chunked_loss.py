"""One propagation, many positives: the ranking loss (BPR, sampled softmax) scored in chunks
gives the gradient of the whole batch's loss, for every method, in one process and on 1 and 2
gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distributed_utils import run_ranks
from gnaq_dist.config import load_config
from gnaq_dist.quant import build_method
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.ranking_loss import row_loss_gradient
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.local import LocalTrainer

METHODS = [("fp", None), ("gnaq", 2), ("gnaq_static", 2), ("gnaq_ste", 2), ("lsq", 2), ("n2uq", 2), ("bigear", 1)]
#: What the distributed loop trains (it refuses BiGeaR), and the one-process runs (BiGeaR needs full propagation).
DISTRIBUTED = [m for m in METHODS if m[0] != "bigear"]
ONE_PROCESS = [(m, b, prop) for m, b in METHODS for prop in ("full", "sampled") if (m, prop) != ("bigear", "sampled")]


def small_data():
    return clustered_interactions(n_users=120, n_items=80, seed=2)


def small_config(method: str, bits: int | None, **extra) -> TrainConfig:
    overrides = [
        f"model.method={method}", f"model.bits={'null' if bits is None else bits}",
        "model.dim=8", "model.num_layers=2", "schedule.epochs=1", "schedule.warmup_epochs=0",
        "schedule.batch_size=400", "schedule.num_negatives=3", "schedule.eval_every=0",
        "schedule.fanouts=[-1,-1]", "optim.lr=0.01", "progress=false", "seed=5", "eval.ks=[10]",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(TrainConfig, [], overrides)


def _whole_loss(loss: str, u: torch.Tensor, p: torch.Tensor, q: torch.Tensor, temperature: float,
                b_pos: torch.Tensor | float = 0.0, b_neg: torch.Tensor | float = 0.0) -> torch.Tensor:
    """The loss as one autograd expression: u, p (B, d), q (B, k, d), items' score biases
    b_pos (B,) and b_neg (B, k) (the user's bias cancels in both losses)."""
    s_neg = (u.unsqueeze(1) * q).sum(-1) + b_neg
    s_pos = (u * p).sum(-1, keepdim=True) + (b_pos.unsqueeze(-1) if torch.is_tensor(b_pos) else b_pos)
    if loss == "bpr":
        return F.softplus(s_neg - s_pos).mean()
    logits = torch.cat([s_pos, s_neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


@pytest.mark.parametrize("loss,temperature", [("bpr", 1.0), ("softmax", 1.0), ("softmax", 0.3)])
def test_chunked_loss_gradient_equals_autograd_of_the_whole_loss(loss, temperature):
    g = torch.Generator().manual_seed(0)
    final = torch.randn(50, 6, generator=g)
    users = torch.randint(0, 20, (37,), generator=g)
    pos = torch.randint(20, 50, (37,), generator=g)
    neg = torch.randint(20, 50, (37, 4), generator=g)
    x = final.clone().requires_grad_()
    ref = _whole_loss(loss, x[users], x[pos], x[neg], temperature)
    ref.backward()
    for fused in (True, False):  # numba's one-pass kernel, torch's chunks
        for chunk in (None, 1, 5, 37, 1000):
            value, grad = row_loss_gradient(final, users, pos, neg, 37, loss, temperature, chunk, fused=fused)
            assert float(value) == pytest.approx(float(ref.detach()), rel=1e-5)
            torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-7)
        value, grad = row_loss_gradient(final, users[:0], pos[:0], neg[:0], 1, loss, temperature, 4, fused=fused)
        assert float(value) == 0.0 and not grad.any()  # no positive on this rank


def test_softmax_weighs_the_hardest_negative_most():
    """Why softmax: BPR's weights of two negatives differ by their sigmoids, softmax's by their
    exponentials, so a hard negative dominates as the temperature falls."""
    final = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.9, 0.1], [-1.0, 0.0]])  # user, positive, hard, easy
    users, pos, neg = torch.tensor([0]), torch.tensor([1]), torch.tensor([[2, 3]])
    _, hot = row_loss_gradient(final, users, pos, neg, 1, "softmax", 0.1)
    _, warm = row_loss_gradient(final, users, pos, neg, 1, "softmax", 1.0)
    ratio = lambda grad: float(grad[2].norm() / grad[3].norm())  # noqa: E731
    assert ratio(hot) > 100 > ratio(warm) > 1


def test_bad_loss_arguments_are_refused():
    final, idx = torch.zeros(3, 2), torch.tensor([0])
    with pytest.raises(Exception, match="loss must be one of"):
        row_loss_gradient(final, idx, idx, idx[:, None], 1, "hinge")
    with pytest.raises(Exception, match="temperature"):
        row_loss_gradient(final, idx, idx, idx[:, None], 1, "softmax", 0.0)


def _reference_gradients(trainer: LocalTrainer, method, users, pos, neg) -> list[torch.Tensor]:
    """The loss as one autograd expression (no chunks, score biases added, L2 on every
    occurrence where the method takes it), its gradients."""
    cfg, n_users = trainer.config, trainer.data.n_users
    pos_nodes, neg_nodes = pos + n_users, neg + n_users
    batch_nodes = torch.unique(torch.cat([users, pos_nodes, neg_nodes.reshape(-1)]))
    final, row_ids = trainer._final_embeddings_for(method, batch_nodes)

    def rows(ids):
        return final[ids] if row_ids is None else final[torch.searchsorted(row_ids, ids)]

    def bias(ids):
        b = method.bias_of(ids.reshape(-1))
        return torch.zeros(ids.shape) if b is None else b.reshape(ids.shape)

    sched = cfg.schedule
    ranking = _whole_loss(sched.loss, rows(users), rows(pos_nodes), rows(neg_nodes), sched.temperature,
                          bias(pos_nodes), bias(neg_nodes))
    reg_rows = method.reg_embeddings(torch.cat([users, pos_nodes, neg_nodes.reshape(-1)]))
    loss = ranking + (cfg.optim.l2 * 0.5 * reg_rows.pow(2).sum() / users.shape[0] if method.uses_l2 else 0.0)
    if method.name == "bigear":  # its distillation: the teacher's top-R items of each positive's user, per layer
        ranks = method.ranks()
        n_layers, top_r = ranks.shape[1], ranks.shape[2]
        d = final.shape[1] // n_layers
        w = torch.exp(-0.1 * torch.arange(1, top_r + 1, dtype=torch.float32))
        for l in range(n_layers):
            f = final[:, l * d:(l + 1) * d]
            s = (rows(users).unsqueeze(1)[..., l * d:(l + 1) * d] * f[ranks[users, l].long() + n_users]).sum(-1)
            loss = loss + (w * F.softplus(-s)).sum() / (users.shape[0] * top_r * n_layers)
    params = [p for p in method.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, allow_unused=True))


@pytest.mark.parametrize("loss", ["bpr", "softmax"])
@pytest.mark.parametrize("method,bits,propagation", ONE_PROCESS)
def test_one_process_chunked_step_has_the_whole_batch_gradient(method, bits, propagation, loss):
    data = small_data()
    trainer = LocalTrainer(small_config(method, bits, **{"schedule.propagation": propagation,
                                                         "schedule.loss_chunk": 7, "schedule.loss": loss,
                                                         "schedule.temperature": 0.5}), data)
    fp = build_method("fp", data.n_nodes, 8, None, 2)
    model = trainer._start_quantized_phase(fp) if method != "fp" else fp
    trainer.batches.set_epoch(1)
    users, pos, neg = next(iter(trainer.batches))
    want = _reference_gradients(trainer, model, users, pos, neg)
    params = [p for p in model.parameters() if p.requires_grad]
    for chunk in (7, 10**6):
        trainer.config.schedule.loss_chunk = chunk
        for p in params:
            p.grad = None
        trainer.backward(model, users, pos, neg)
        for p, w in zip(params, want):
            if w is None:
                assert p.grad is None or not p.grad.any()
                continue
            torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-7, msg=lambda m: f"{method} {chunk}: {m}")
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def scenario_gradients(rank: int, world: int, runs: list[tuple[str, int | None, str, int, str]]) -> list[dict]:
    """One quantized step per run; the row and dense gradients each owner applied, by global id."""
    from gnaq_dist.distributed.trainer import DistributedTrainer

    data = small_data()
    out = []
    for method, bits, propagation, chunk, loss in runs:
        cfg = small_config(method, bits, **{"schedule.propagation": propagation, "schedule.loss_chunk": chunk,
                                            "schedule.loss": loss, "schedule.temperature": 0.5})
        trainer = DistributedTrainer(cfg, data)
        trainer._start_fp()
        if method != "fp":
            trainer._start_quantized()
        trainer.batches.set_epoch(1)
        batch = next(iter(trainer.batches))
        shard = trainer.shard
        seen: dict = {}
        apply_rows, apply_dense = shard.apply_row_gradients, shard.apply_dense

        def rows_hook(rows, grads, clip, extra=None, _orig=apply_rows, _seen=seen, _shard=shard):
            local = torch.arange(_shard.num_owned) if rows is None else rows
            _seen["ids"] = np.asarray(_shard.owned)[local.numpy()]
            _seen["rows"] = [g.detach().clone().reshape(g.shape[0], -1).numpy() for g in grads + list(extra or [])]
            return _orig(rows, grads, clip, extra)

        def dense_hook(clip, _orig=apply_dense, _seen=seen, _shard=shard):
            _seen["dense"] = [p.grad.detach().clone().numpy() for p in _shard.dense]
            return _orig(clip)

        shard.apply_row_gradients, shard.apply_dense = rows_hook, dense_hook
        loss = trainer.step(*batch)
        out.append({"ids": np.asarray(seen["ids"]), "rows": seen["rows"], "dense": seen.get("dense", []),
                    "loss": loss})
    return out


def _global_rows(per_rank: list[dict], n: int) -> list[np.ndarray]:
    """Each message's gradient rows placed at their global ids (rows nobody touched: zero)."""
    tables = []
    for j in range(len(per_rank[0]["rows"])):
        width = per_rank[0]["rows"][j].shape[1]
        table = np.zeros((n, width), dtype=np.float64)
        for r in per_rank:
            table[np.asarray(r["ids"], dtype=np.int64)] += r["rows"][j]
        tables.append(table)
    return tables


@pytest.mark.slow
def test_chunked_gradient_is_the_same_on_one_and_two_ranks_for_every_method():
    runs = [(m, b, prop, chunk, loss) for m, b in DISTRIBUTED for prop in ("full", "sampled") for chunk in (5, 10**6)
            for loss in ("bpr", "softmax")]
    one = run_ranks(scenario_gradients, 1, runs, timeout=300)
    two = run_ranks(scenario_gradients, 2, runs, timeout=300)
    n = small_data().n_nodes
    by_run = {}
    for i, run in enumerate(runs):
        for world, ranks in ((1, one), (2, two)):
            parts = [ranks[r][i] for r in range(world)]
            loss = sum(p["loss"] for p in parts)
            by_run[(run, world)] = (_global_rows(parts, n), parts[0]["dense"], loss)
    for method, bits, prop, _, kind in runs:
        ref_rows, ref_dense, ref_loss = by_run[((method, bits, prop, 10**6, kind), 1)]
        assert any(np.abs(t).sum() > 0 for t in ref_rows), (method, prop, kind)
        for chunk in (5, 10**6):
            for world in (1, 2):
                rows, dense, loss = by_run[((method, bits, prop, chunk, kind), world)]
                what = (method, prop, chunk, world, kind)
                assert loss == pytest.approx(ref_loss, rel=1e-5), what
                for got, want in zip(rows, ref_rows):
                    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=str(what))
                for got, want in zip(dense, ref_dense):
                    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=str(what))
