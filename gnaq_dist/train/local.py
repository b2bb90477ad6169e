"""Single-process training of LightGCN with any embedding method (fp, GNAQ, baselines).

The schedule is the paper's: a full-precision warm-up (``schedule.warmup_epochs``)
trains an fp LightGCN, whose layer-0 table initialises the quantized method, which then
trains for the rest of the budget. The time of each phase is reported, and evaluation
always scores from the *packed* table (what a checkpoint or an exported bundle holds),
not from the training-time tensors.

With ``checkpoints=True`` (what ``gnaq train`` asks for) the run writes the distributed
trainer's checkpoint format as a world of one rank (:mod:`gnaq_dist.train.checkpoints`)
under ``config.checkpoint_root``: every ``checkpoint.every_epochs`` epochs and always at
the end (a ``schedule.max_minutes`` budget included), and resumes as ``checkpoint.resume``
says. Library callers that only want metrics (the reproduction pipelines) leave it off.

With ``schedule.early_stopping.patience`` the last phase stops once a held-out metric
stops improving, and the run ends with the best evaluation's tables
(:mod:`gnaq_dist.train.early_stopping`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from gnaq_dist.allocator import retain_freed_memory
from gnaq_dist.evaluation import evaluate_ranking, finalize, users_to_evaluate
from gnaq_dist.graph import BipartiteGraph, build_graph, interactions_csr
from gnaq_dist.interactions import InteractionData
from gnaq_dist.propagation import final_from_packed, propagate_blocks, propagate_full
from gnaq_dist.quant import build_method
from gnaq_dist.quant.base import EmbeddingMethod, score_rows
from gnaq_dist.quant.drift import epoch_fields, epoch_sums
from gnaq_dist.quant.packing import storage_report
from gnaq_dist.runlog import RunLog
from gnaq_dist.sampling import BPRBatches, NeighborBlockSampler
from gnaq_dist.seeding import seed_everything
from gnaq_dist.train.ranking_loss import batch_rows, row_loss_gradient
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.early_stopping import EarlyStopping, early_stopping_for
from gnaq_dist.train.schedule import PhaseTimes, Schedule, TimeBudget


@dataclass
class WarmStart:
    """Full-precision layer-0 weights after the warm-up, shared by several methods.

    The reproduction pipeline trains the fp model once and branches every quantized
    method from its state at ``epoch``: same seed and batches, so this equals running
    each method's own warm-up, at a fraction of the cost.
    """

    weight: torch.Tensor
    epoch: int
    seconds: float
    steps: int


@dataclass
class TrainResult:
    metrics: dict[str, float]  # final evaluation (from the packed table)
    history: list[dict[str, Any]]  # one record per evaluation
    phase_seconds: dict[str, float]  # fp (warm-up) / quantized / eval wall time
    phase_epochs: dict[str, int]
    seconds_per_epoch: float  # training time only, averaged over all epochs
    storage: dict[str, float]  # bytes per node, ratio to fp32, ...
    method: EmbeddingMethod = field(repr=False)
    warm_start: WarmStart | None = field(default=None, repr=False)  # fp state captured at capture_epoch
    checkpoint: str | None = None  # URI of the run's final checkpoint (with checkpoints=True)
    resumed_from: dict[str, Any] | None = None  # the checkpoint this run started from, if any
    early_stopping: dict[str, Any] | None = None  # best epoch, metric, whether it stopped (schedule.early_stopping)
    latent_lr: float | None = None  # gnaq_lat: the (mean) latent step the run trained with (model.latent_lr resolved)


class LocalTrainer:
    """Holds the state of one single-process run: graph, method, optimizer, log."""

    def __init__(self, config: TrainConfig, data: InteractionData, log: RunLog | None = None, *,
                 checkpoints: bool = False):
        config.validate()
        self.config = config
        self.data = data
        self.log = log or RunLog(None)
        self.records: list[dict[str, Any]] = []  # every log record of the run (a checkpoint's history)
        self.positives = 0  # positives trained on, over all steps (resumed ones included)
        self.checkpoints = None
        if checkpoints:
            from gnaq_dist.dataset import data_key
            from gnaq_dist.train.checkpoints import OneProcessCheckpoints

            self.checkpoints = OneProcessCheckpoints(config, data_key(data))
        if config.threads:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        self.graph: BipartiteGraph = build_graph(data)
        self.train_csr = self.graph.train_csr()
        held_user, held_item = data.split(config.eval.split)
        self.test_csr = interactions_csr(held_user, held_item, data.n_users, data.n_items)
        self.eval_users = users_to_evaluate(self.test_csr[0], config.eval.max_users, config.seed)
        self.stopper: EarlyStopping | None = early_stopping_for(config, data, self.train_csr)  # one run's
        self.sampler = (
            NeighborBlockSampler(self.graph, config.schedule.fanouts, num_layers=config.model.num_layers)
            if config.schedule.propagation == "sampled"
            else None
        )
        self.schedule = Schedule.of(config, data.n_train)
        self.batches = BPRBatches(self.graph, self.schedule.batch_size, config.schedule.num_negatives,
                                  seed=config.seed)
        self.steps_per_epoch = len(self.batches)
        self.global_step = 0

    # -- one optimisation step -------------------------------------------------------
    def _final_embeddings_for(self, method: EmbeddingMethod, node_ids: torch.Tensor):
        """Final embeddings of ``node_ids`` (sorted, unique) and their layer-0 rows."""
        L = self.config.model.num_layers
        if self.sampler is None:
            layers = propagate_full(self.graph, method.embed(None), L, method.layer_fn)
            return method.combine(layers), None
        input_nodes, blocks = self.sampler.sample(node_ids)
        layers = propagate_blocks(blocks, method.embed(input_nodes), L, method.layer_fn)
        return method.combine(layers), node_ids

    def step(self, method: EmbeddingMethod, optimizer: torch.optim.Optimizer, users, pos, neg) -> float:
        cfg = self.config
        if cfg.retain_freed_memory:  # from the first step on: setup's transients are gone
            retain_freed_memory()
        optimizer.zero_grad(set_to_none=True)
        bpr, batch_nodes, final, batch_index = self.backward(method, users, pos, neg)
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_value_(method.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        self.positives += int(users.shape[0])
        refine_every = cfg.model.refine_steps
        if self.schedule.latent_lr is not None:  # gnaq_lat: this step's latent step
            method.latent_lr = self.schedule.latent_lr_at(self.global_step)
        if refine_every and method.refines and (self.global_step + 1) % refine_every == 0:
            # Re-assign codes from the propagated embeddings of this step's forward (before the
            # optimizer step, as the reference): every node's with full propagation (no extra
            # propagation), the batch's nodes with sampled blocks (the only rows propagated).
            with torch.no_grad():
                if batch_index is None:
                    method.refine(None, final)
                else:
                    method.refine(batch_nodes, final[batch_index])
        self.global_step += 1
        return bpr

    def backward(self, method: EmbeddingMethod, users, pos, neg):
        """One propagation, the BPR + L2 loss of every positive (:mod:`gnaq_dist.train.ranking_loss`),
        one backward: gradients accumulate in ``method``'s parameters.

        Returns the BPR loss, the batch's nodes (sorted, unique), the final rows (detached) and
        the batch nodes' indices into them (None with full propagation: the rows are every node)."""
        cfg = self.config
        n_users = self.data.n_users
        pos_nodes = pos + n_users
        neg_nodes = neg + n_users
        rows = batch_rows(users, pos_nodes, neg_nodes)
        batch_nodes = rows.nodes
        final, row_ids = self._final_embeddings_for(method, batch_nodes)
        # Full propagation: rows of final are node ids; sampled: the batch's nodes, in order.
        index = (users, pos_nodes, neg_nodes, None) if row_ids is None else \
            (rows.users, rows.pos, rows.neg, torch.arange(batch_nodes.shape[0]))
        node_ids = torch.arange(final.shape[0]) if row_ids is None else row_ids
        scored = score_rows(final, method.bias_of(row_ids), node_ids < n_users)
        sched = cfg.schedule
        bpr, grad = row_loss_gradient(scored, *index[:3], users.shape[0], sched.loss, sched.temperature,
                                      sched.loss_chunk)
        method.extra_loss(scored, users, grad)  # BiGeaR's distillation (full propagation: rows are node ids)
        outputs, grads = [scored], [grad]
        if method.uses_l2:
            # L2 on the layer-0 rows of every occurrence in the batch: each unique row weighted by its count.
            reg_rows = method.reg_embeddings(batch_nodes)
            reg = cfg.optim.l2 * 0.5 * (rows.counts.to(reg_rows.dtype) * reg_rows.pow(2).sum(1)).sum() / users.shape[0]
            outputs.append(reg)
            grads.append(torch.ones_like(reg))
        torch.autograd.backward(outputs, grads)
        return float(bpr), batch_nodes, final.detach(), index[3]

    # -- evaluation from the packed table --------------------------------------------
    @torch.no_grad()
    def final_embeddings(self, method: EmbeddingMethod) -> torch.Tensor:
        """All nodes' final embeddings as inference computes them: from storage form."""
        L = self.config.model.num_layers
        if method.name == "fp":
            return method.combine(propagate_full(self.graph, method.embed(None), L, method.layer_fn))
        packed = method.pack(level_dtype=getattr(torch, self.config.model.level_dtype))
        return final_from_packed(self.graph, packed, method.combine, L)

    def evaluate(self, method: EmbeddingMethod, final: torch.Tensor | None = None) -> dict[str, float]:
        final = self.final_embeddings(method) if final is None else final
        n_users = self.data.n_users
        bias = method.bias_of(None)
        if bias is not None:  # as the packed table stores it (model.level_dtype)
            bias = bias.detach().to(getattr(torch, self.config.model.level_dtype)).to(torch.float32)
        final = score_rows(final, bias, torch.arange(final.shape[0]) < n_users)
        sums = evaluate_ranking(
            final[:n_users],
            final[n_users:],
            self.eval_users,
            self.train_csr,
            self.test_csr,
            ks=tuple(self.config.eval.ks),
            batch_size=self.config.eval.batch_size,
            progress=self.config.progress,
        )
        return finalize(sums)

    # -- the run ---------------------------------------------------------------------
    def _log(self, event: str, **fields: Any) -> dict[str, Any]:
        record = self.log.write(event, **fields)
        self.records.append(record)
        return record

    def _save(self, epoch: int, phase: str, method: EmbeddingMethod, optimizer: torch.optim.Optimizer | None) -> str:
        uri = self.checkpoints.save(step=self.global_step, epoch=epoch, phase=phase, method=method,
                                    optimizer=optimizer, positives=self.positives, history=self.records)
        self._saved = (self.global_step, phase)
        self._last_checkpoint = uri
        self._log("checkpoint", epoch=epoch, phase=phase, step=self.global_step, uri=uri)
        return uri

    def _optimizer(self, method: EmbeddingMethod, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=lr)

    def run(
        self,
        warm_start: WarmStart | None = None,
        capture_epoch: int | None = None,
        on_epoch_end: Callable[[int, EmbeddingMethod], None] | None = None,
    ) -> TrainResult:
        """Train; ``warm_start`` skips the warm-up, ``capture_epoch`` snapshots the fp table,
        ``on_epoch_end(epoch, method)`` runs after every epoch (checkpoints, snapshots)."""
        cfg = self.config
        sched = cfg.schedule
        data = self.data
        N, d, L = data.n_nodes, cfg.model.dim, cfg.model.num_layers
        plan = self.schedule
        warmup_epochs = plan.warmup_epochs
        total_epochs = plan.epochs
        total_steps = plan.total_steps
        budget = TimeBudget(sched.max_minutes)

        every = cfg.checkpoint.every_epochs if self.checkpoints is not None else 0
        self._saved: tuple[int, str] | None = None  # (step, phase) of the last checkpoint written or loaded
        self._last_checkpoint: str | None = None
        resume = self.checkpoints.find_resume() if self.checkpoints is not None else None
        if resume is not None and warm_start is not None:
            raise ValueError("a warm start and a checkpoint to resume from: pass one (checkpoint.resume=never)")
        # "fp": the full-precision phase (the warm-up of a quantized method, or all of fp).
        phase = "fp"
        resumed = None
        if resume is None:
            method: EmbeddingMethod = build_method("fp", N, d, None, L)
            optimizer = self._optimizer(method, cfg.optim.lr)
        else:
            from gnaq_dist.train.checkpoints import restore

            method, optimizer = restore(resume, N, self.graph, cfg.optim.lr, cfg.optim.rate("quantized"),
                                        cfg.storage_options, latent_lr=self.schedule.latent_lr)
            m = resume.manifest
            phase = m["phase"]
            self.global_step = int(m["step"])
            self.positives = int(m["progress"].get("positives", 0))
            self.records = list(m.get("history", []))
            self._saved = (self.global_step, phase)
            self._last_checkpoint = resume.uri
            resumed = {"uri": resume.uri, "step": self.global_step, "epoch": int(m["epoch"]),
                       "world_size_then": int(m["world_size"])}
        times = PhaseTimes()
        history: list[dict[str, Any]] = []
        metrics: dict[str, float] = {}
        self._log("start", method=cfg.model.method, bits=cfg.model.bits, n_users=data.n_users,
                  n_items=data.n_items, n_train=data.n_train, steps_per_epoch=self.steps_per_epoch,
                  batch_size=plan.batch_size, epochs=total_epochs,
                  warmup_epochs=warmup_epochs if cfg.quantized else 0, max_minutes=sched.max_minutes,
                  **({"latent_lr": self.schedule.latent_lr, "latent_decay": plan.latent_decay}
                     if self.schedule.latent_lr is not None else {}))
        bar = tqdm(total=total_steps, desc=f"{cfg.model.method}", unit="step", disable=not cfg.progress,
                   dynamic_ncols=True)
        epoch = 0
        first_epoch = 1
        captured: WarmStart | None = None
        stopper = self.stopper
        stop = False
        if resume is not None:
            epoch = int(resume.manifest["epoch"])
            first_epoch = epoch + 1
            bar.update(min(self.global_step, total_steps))
            if cfg.checkpoint.eval_on_resume:
                metrics = self.evaluate(method)
                history.append(self._log("eval", epoch=epoch, phase="resume", step=self.global_step, **metrics))
        if warm_start is not None:
            if not cfg.quantized or warm_start.epoch != warmup_epochs:
                raise ValueError("a warm start needs a quantized method and the same warm-up length")
            with torch.no_grad():
                method.init_from_full_precision(warm_start.weight)
            first_epoch = warm_start.epoch + 1
            self.global_step = warm_start.steps
            times.seconds["fp"] = warm_start.seconds
            times.epochs["fp"] = warm_start.epoch
            times.steps["fp"] = warm_start.steps
            bar.update(min(warm_start.steps, total_steps))
        budget.start()
        out_of_time = False
        try:
            for epoch in range(first_epoch, total_epochs + 1):
                if plan.steps_done(self.global_step) or out_of_time:
                    break
                if phase == "fp" and plan.quantize_at(epoch):
                    method = self._start_quantized_phase(method)
                    optimizer = self._optimizer(method, cfg.optim.rate("quantized"))
                    phase = "quantized"
                    bar.set_description(f"{cfg.model.method}-{cfg.model.bits}b")
                lr = cfg.optim.rate(phase) * plan.lr_factor(epoch)  # optim.lr_decay: the epoch's rate
                for group in optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                losses = []
                self.batches.set_epoch(epoch)
                codes_before = method.code_state()
                for users, pos, neg in self.batches:
                    if plan.steps_done(self.global_step):
                        break
                    if budget.spent():
                        out_of_time = True
                        bar.write(f"time limit: {sched.max_minutes:g} min reached after {self.global_step} steps")
                        break
                    losses.append(self.step(method, optimizer, users, pos, neg))
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}", phase=phase)
                times.seconds[phase] += time.perf_counter() - t0  # also an epoch the budget cut before a step
                if capture_epoch == epoch and method.name == "fp":
                    captured = WarmStart(method.embed(None).detach().clone(), epoch,
                                         times.seconds[phase], self.global_step)
                if not losses:  # the budget ran out before this epoch's first step
                    epoch -= 1
                    break
                times.epochs[phase] += 1
                times.steps[phase] += len(losses)
                seconds = time.perf_counter() - t0
                quant = epoch_fields(epoch_sums(method, codes_before, getattr(torch, cfg.model.level_dtype)))
                self._log("epoch", epoch=epoch, phase=phase, loss=float(np.mean(losses)),
                          seconds=seconds, step=self.global_step, steps=len(losses),
                          elapsed=budget.elapsed(), lr=lr, **quant)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, method)
                last = plan.last_epoch(epoch, self.global_step, out_of_time)
                if last or plan.evaluate_after(epoch):
                    t1 = time.perf_counter()
                    final = self.final_embeddings(method)
                    metrics = self.evaluate(method, final)
                    record = self._log("eval", epoch=epoch, phase=phase, step=self.global_step,
                                       train_seconds=times.train_seconds(), **metrics)
                    history.append(record)
                    bar.write(f"epoch {epoch} [{phase}] " + "  ".join(
                        f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith("@20") or k.endswith("@10")))
                    if stopper is not None and phase == ("quantized" if cfg.quantized else "fp"):
                        stop = self._early_stopping_step(stopper, final, metrics, epoch, method, optimizer,
                                                         times.seconds[phase])
                        last = last or stop
                    del final
                    times.seconds["eval"] += time.perf_counter() - t1
                # A run whose budget ends inside the warm-up is checkpointed once quantized (below).
                # With early stopping the last state may not be the one kept: the final save is below.
                if every and (last or epoch % every == 0) and not (last and plan.quantize_at_end(phase)) \
                        and not (last and stopper is not None):
                    self._save(epoch, phase, method, optimizer)
                if stop:
                    break
        finally:
            bar.close()
        stopping = None
        if stopper is not None and stopper.best_epoch is not None:
            stopper.restore(method, optimizer)
            metrics = stopper.best_metrics
            stopping = stopper.report(epoch)
            self._log("early_stopping", **stopping)
            bar.write(stopper.message(epoch))
        if plan.quantize_at_end(phase):
            # The budget (max_steps, max_minutes) ended inside the warm-up: quantize what we have.
            method = self._start_quantized_phase(method)
            optimizer = self._optimizer(method, cfg.optim.rate("quantized"))  # the phase's own, checkpointed
            phase = "quantized"
            metrics = {}
        if plan.evaluate_at_end(metrics, bool(history) and history[-1]["step"] == self.global_step):
            metrics = self.evaluate(method)
            history.append(self._log("eval", epoch=epoch, phase=phase, step=self.global_step,
                                     train_seconds=times.train_seconds(), **metrics))
        checkpoint = None
        if self.checkpoints is not None:
            # The final checkpoint, whatever every_epochs says: every run leaves a model to export.
            if self._saved != (self.global_step, phase):
                self._save(epoch, phase, method, optimizer)
            checkpoint = self._last_checkpoint
        storage = self.storage(method)
        result = TrainResult(
            metrics=metrics, history=history, phase_seconds=times.seconds, phase_epochs=times.epochs,
            seconds_per_epoch=times.seconds_per_epoch(), storage=storage, method=method,
            warm_start=captured, checkpoint=checkpoint, resumed_from=resumed, early_stopping=stopping,
            latent_lr=self.schedule.latent_lr,
        )
        self._log("end", metrics=metrics, phase_seconds=times.seconds, phase_epochs=times.epochs,
                  seconds_per_epoch=result.seconds_per_epoch, storage=storage,
                  **({"early_stopping": stopping} if stopping else {}))
        return result

    def _early_stopping_step(self, stopper: EarlyStopping, final: torch.Tensor, metrics: dict[str, float],
                             epoch: int, method: EmbeddingMethod, optimizer: torch.optim.Optimizer,
                             seconds: float) -> bool:
        """One evaluation for early stopping (logged); True when training should stop."""
        value = stopper.measure(final, metrics)
        stop = stopper.observe(value, epoch=epoch, step=self.global_step, seconds=seconds, metrics=metrics,
                               method=method, optimizer=optimizer)
        s = stopper.settings
        self._log("stopping_eval", epoch=epoch, step=self.global_step, split=s.split, metric=s.metric,
                  value=value, best_epoch=stopper.best_epoch, best_value=stopper.best_value,
                  since_best=stopper.since_best)
        return stop

    def _start_quantized_phase(self, fp_method: EmbeddingMethod) -> EmbeddingMethod:
        cfg = self.config
        method = build_method(
            cfg.model.method, self.data.n_nodes, cfg.model.dim, cfg.model.bits, cfg.model.num_layers,
            **self.schedule.method_options(cfg), graph=self.graph, seed=cfg.seed,
        )
        with torch.no_grad():
            method.init_from_full_precision(fp_method.embed(None).detach().clone())
        return method

    def storage(self, method: EmbeddingMethod) -> dict[str, float]:
        d = self.config.model.dim
        if method.name == "fp":
            return {"bytes_per_node": 4.0 * d, "fp32_bytes_per_node": 4.0 * d, "compression_ratio": 1.0}
        packed = method.pack(level_dtype=getattr(torch, self.config.model.level_dtype))
        report = storage_report(packed)  # with the score bias counted, where the method has one
        # Compare with the fp32 layer-0 table the model replaces (d floats per node).
        latent = float(getattr(method, "latent_bytes_per_node", 0.0))
        if latent:  # gnaq_lat: the integer latent that training goes on from counts too
            report["served_bytes_per_node"] = report["bytes_per_node"]
            report["latent_bytes_per_node"] = latent
            report["bytes_per_node"] += latent
        report["fp32_bytes_per_node"] = 4.0 * d
        report["compression_ratio"] = 4.0 * d / report["bytes_per_node"]
        return report


def train_local(config: TrainConfig, data: InteractionData | None = None, log_path: str | Path | None = None,
                *, checkpoints: bool = False) -> TrainResult:
    """Train one configuration in this process (loads ``config.dataset`` if no data given).

    ``log_path``: where metrics.jsonl goes (a local path or any fsspec URI, with
    ``config.storage_options``). ``checkpoints``: write checkpoints under
    ``config.checkpoint_root`` (every ``checkpoint.every_epochs`` and a final one) and resume
    as ``checkpoint.resume`` says; local paths in the config are made absolute first, so
    the manifest names the dataset from anywhere.
    """
    if checkpoints:
        from gnaq_dist.storage import absolute_if_local

        config.dataset = absolute_if_local(config.dataset)
        config.out = absolute_if_local(config.out)
        if config.checkpoint.dir:
            config.checkpoint.dir = absolute_if_local(config.checkpoint.dir)
        if config.checkpoint.resume not in ("auto", "never"):
            config.checkpoint.resume = absolute_if_local(config.checkpoint.resume)
    if data is None:
        from gnaq_dist.dataset import load_dataset

        data = load_dataset(config.dataset, storage_options=config.storage_options)
    return LocalTrainer(config, data, RunLog(log_path, config.storage_options), checkpoints=checkpoints).run()
