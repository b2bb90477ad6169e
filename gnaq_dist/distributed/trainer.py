"""The per-worker distributed trainer: setup, the data-parallel step and the run loop.

Called on every rank inside an initialised default process group (Ray Train sets one up;
tests use plain gloo ranks): :func:`train_worker`. It walks the one-process trainer's
schedule (:mod:`gnaq_dist.train.schedule`: fp warm-up, then the quantized phase from
``init_from_full_precision``, BPR + L2, evaluation from the packed table), with these
differences, documented in docs/distributed.md:

* every rank holds only the rows it owns (``partition``) and their optimizer state;
  the rows a step needs travel in the method's wire form (:mod:`.sharded`);
* all ranks walk the same global BPR batches; a rank keeps the positives whose user it
  owns and normalises its loss by the *global* batch size, so the gradients the owners
  sum are the single-process gradient;
* ``propagation: sampled`` runs on DGL neighbour-sampled blocks of each rank's batch nodes;
  ``propagation: full`` splits full-graph propagation by owner (:mod:`.halo`): each rank
  computes its own nodes' layers and swaps the boundary rows, which is exact and divides
  the sparse products between the ranks;
* row parameters use lazy, row-sparse Adam (:mod:`.sparse_adam`), the same for every W.

Everything a rank does per step is a fixed sequence of collectives, so a rank with no
positive in a batch still joins every one of them (with empty messages). Checkpoints
(:mod:`.checkpointing`), evaluation (:mod:`.evaluation`) and the run's byte counts
(:mod:`.metrics`) live in their own modules.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from gnaq_dist.allocator import release_free_memory, retain_freed_memory
from gnaq_dist.dataset import data_key
from gnaq_dist.distributed.checkpointing import RankCheckpoints, ResumeHint
from gnaq_dist.distributed.comm import allreduce_dense, allreduce_sum, broadcast_partition, run_on_rank_then_agree
from gnaq_dist.distributed.compression import ErrorFeedback, RowCompressor
from gnaq_dist.distributed.evaluation import evaluate as evaluate_run
from gnaq_dist.distributed.evaluation import gather_latent
from gnaq_dist.distributed.halo import HaloPlan, final_own_rows
from gnaq_dist.distributed.halo_exchange import FixedExchange
from gnaq_dist.distributed.metrics import RunWire, steady_throughput
from gnaq_dist.distributed.partition import Partition, partition_nodes
from gnaq_dist.distributed.partition_store import read_partition
from gnaq_dist.distributed.row_exchange import fetch_rows, push_row_gradients
from gnaq_dist.distributed.rows import LatentShard
from gnaq_dist.distributed.sharded import MethodShard, build_shard_method
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.evaluation import users_to_evaluate
from gnaq_dist.graph import BipartiteGraph, TrainCSR, build_graph_from_arrays, csr_rows_of, interactions_csr
from gnaq_dist.interactions import InteractionData
from gnaq_dist.propagation import propagate_blocks
from gnaq_dist.quant import build_method
from gnaq_dist.quant.base import init_normal_rows, score_rows
from gnaq_dist.quant.dequant_kernels import warm_up
from gnaq_dist.quant.drift import epoch_fields, epoch_sums
from gnaq_dist.runlog import RunLog
from gnaq_dist.sampling import NeighborBlockSampler, OwnedBPRBatches
from gnaq_dist.seeding import seed_everything
from gnaq_dist.train.ranking_loss import BatchRows, batch_rows, row_loss_gradient, row_loss_into
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.schedule import PhaseTimes, Schedule, TimeBudget

log = logging.getLogger(__name__)

Report = Callable[[dict], None]

#: The largest global batch for which ``retain_freed_memory: null`` keeps freed memory.
RETAIN_MAX_BATCH = 1 << 16


class DistributedTrainer:
    """One rank's state: the graph (replicated, or its rows when split by owner), the partition, its
    shard, counters and log; :meth:`step` and :meth:`run` train it."""

    #: Keep every user's train edges after setup with the graph split by owner (normally a rank
    #: keeps its own users' only). Only for comparing the split evaluation with the gathered one,
    #: which rebuilds the whole graph.
    keep_whole_edges: bool = False

    def __init__(self, config: TrainConfig, data: InteractionData | None = None, report: Report | None = None,
                 resume_hint: ResumeHint | None = None, final_checkpoint: bool = False, prune_checkpoints: bool = True):
        if not dist.is_initialized():
            raise RuntimeError("train_worker needs an initialised default process group")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.report = report
        self.final_checkpoint = final_checkpoint  # a checkpoint at the end also with every_epochs 0
        self.log = RunLog(None)
        self.history: list[dict[str, Any]] = []
        def load() -> InteractionData:
            config.validate()
            config.check_distributed()
            if data is not None:
                return data
            from gnaq_dist.dataset import load_dataset

            return load_dataset(config.dataset, storage_options=config.storage_options)

        data = run_on_rank_then_agree(load, "loading the config and the dataset")
        self.config = config
        self.data = data
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.distributed.workers not in (1, self.world):
            log.warning("distributed.workers is %d but the process group has %d ranks: using %d",
                        config.distributed.workers, self.world, self.world)
        seed_everything(config.seed)
        split = config.schedule.propagation == "full"
        # Split by owner, a rank builds its rows of A_hat from the train CSR; the whole graph is
        # built only where something needs it (METIS on rank 0, sampled blocks, a gathered evaluation).
        self.edges = TrainCSR.from_pairs(data.n_users, data.n_items, data.train_user, data.train_item)
        self.edges_whole = True  # every user's train edges (False: this rank's own users' only)
        self.graph: BipartiteGraph | None = None
        if not split:
            self.whole_graph()
        self.train_csr = self.edges.train_csr()
        held_user, held_item = data.split(config.eval.split)
        self.test_csr = interactions_csr(held_user, held_item, data.n_users, data.n_items)
        self.data_key = data_key(data)
        self.n_train = data.n_train
        if split:
            self._release_pairs()
        self.checkpoints = RankCheckpoints(config, self.rank, self.world, self.data_key, prune=prune_checkpoints)
        self.resume = self.checkpoints.find_resume(resume_hint)
        self.partition = self._partition()
        all_eval_users = users_to_evaluate(self.test_csr[0], config.eval.max_users, config.seed)
        self.eval_users = all_eval_users[self.partition.owner[all_eval_users] == self.rank]
        L = config.model.num_layers
        self.sampler, self.halo = None, None
        own_users = self.partition.owner[: data.n_users] == self.rank
        all_indptr = self.edges.indptr
        if split:
            self.halo = HaloPlan.from_train_csr(*self.train_csr, self.partition, self.rank,
                                                shared_memory_dir=config.distributed.shared_memory_dir)
            if not self.keep_whole_edges:
                # From here on a rank reads its own users' rows only (their positives, negatives,
                # ranking masks): the per-edge arrays follow the shard.
                self.edges, self.edges_whole = self.edges.rows_of(own_users), False
                self.train_csr = self.edges.train_csr()
                self.test_csr = csr_rows_of(*self.test_csr, own_users)
        else:
            self.sampler = NeighborBlockSampler(self.graph, config.schedule.fanouts, num_layers=L) if L > 0 else None
        self.schedule = Schedule.of(config, self.n_train)
        self.batches = OwnedBPRBatches(all_indptr, self.edges, own_users, self.schedule.batch_size,
                                       config.schedule.num_negatives, seed=config.seed)
        self.steps_per_epoch = len(self.batches)
        self.global_step = 0
        self.owned_t = torch.from_numpy(self.partition.owned_ids(self.rank))
        self._items: FixedExchange | None = None  # every item's final row (full-graph steps)
        self.wire = RunWire()  # bytes of the steps, refinement and whole-table gathers
        self.positives = 0  # global positives trained on (edges)
        self.level_dtype = getattr(torch, config.model.level_dtype)
        self.shard: MethodShard | None = None
        self.compressors: list[RowCompressor] = []
        self.feedback: list[ErrorFeedback | None] = []
        release_free_memory()  # setup's transients, which the allocators would otherwise keep

    # -- setup ---------------------------------------------------------------------------
    def _partition(self) -> Partition:
        """The owners every rank uses: the checkpoint's, a stored partition, or rank 0's (collective)."""
        part = self.checkpoints.saved_partition(self.resume, self.data.n_users, self.data.n_items)
        if part is not None:
            return part
        dcfg = self.config.distributed
        if dcfg.partition_file:  # computed apart (gnaq partition): no whole graph on any rank
            return run_on_rank_then_agree(lambda: read_partition(dcfg.partition_file, self.config.storage_options,
                                                                 world_size=self.world, data=self.data_key),
                                          f"reading distributed.partition_file {dcfg.partition_file}")
        part = None
        if self.rank == 0:
            method = dcfg.partition
            # Hash partitioning reads only the node counts; METIS reads the whole graph once.
            graph = self.whole_graph() if method == "metis" and self.world > 1 else self.edges
            part = partition_nodes(graph, self.world, method, seed=self.config.seed)
            if self.config.schedule.propagation == "full":
                self.graph = None  # built for METIS only
        return broadcast_partition(part, 0)

    def _release_pairs(self) -> None:
        """Split by owner a rank needs the train CSR (its rows of ``A_hat``, negatives, ranking),
        not the dataset's pair arrays (16 bytes per train and test pair): drop them."""
        empty = np.zeros(0, dtype=np.int64)
        self.data = dataclasses.replace(self.data, train_user=empty, train_item=empty, test_user=empty,
                                        test_item=empty, valid_user=None, valid_item=None,
                                        meta={k: v for k, v in self.data.meta.items()
                                              if not isinstance(v, np.ndarray)})

    def whole_graph(self) -> BipartiteGraph:
        """The whole symmetric training graph, built from the train CSR when first needed."""
        if self.graph is None:
            if not self.edges_whole:
                raise RuntimeError("this rank keeps its own users' train edges only: the whole graph cannot be "
                                   "rebuilt (DistributedTrainer.keep_whole_edges)")
            indptr, items = self.edges.train_csr()
            users = np.repeat(np.arange(self.data.n_users, dtype=np.int64), np.diff(indptr))
            self.graph = build_graph_from_arrays(self.data.n_users, self.data.n_items, users, items)
        return self.graph

    def _new_shard(self, method, lr: float) -> tuple[MethodShard, list[ErrorFeedback | None]]:
        """This rank's shard of ``method`` with its optimizer, gradient compressors and error feedback."""
        dcfg = self.config.distributed
        self.shard = MethodShard(method, self.partition, self.rank, lr, self.level_dtype)
        self.compressors, self.feedback = [], []
        for i, k in enumerate(self.shard.gradient_widths()):
            # Each rank and message gets its own stream for stochastic rounding.
            seed = (self.config.seed * 1_000_003 + self.rank * 101 + i) % (2**63)
            self.compressors.append(RowCompressor(dcfg.grad_bits, stochastic=dcfg.stochastic_rounding, seed=seed))
            use_ef = dcfg.grad_bits is not None and dcfg.error_feedback
            self.feedback.append(ErrorFeedback(self.partition.num_nodes, k) if use_ef else None)
        return self.shard, self.feedback

    def _reserve_step_tables(self) -> None:
        """The step's kept tables (HaloPlan.reserve) and Adam's moments made and touched, and
        numba's kernels loaded, before an epoch's steps rather than in its first step: after
        setup's and the quantized start's transients are gone (reserved beside those, they
        would raise the peak), and again after an evaluation or a checkpoint freed them. Then
        the ranks start the epoch together: no rank's first step counts a wait for another's
        setup."""
        if self.halo is not None and self.shard is not None and self.shard.method.linear_layers:
            self.halo.reserve(self.shard.method.dim, input_table=not self._plain_rows())
        if self.shard is not None:
            self.shard.optimizer.reserve()  # Adam's moments (8 bytes a value)
            if self.shard.format in ("packed", "derived"):
                warm_up(self.shard.method.bits)  # numba's first call, not the first step's
        if self.world > 1:
            dist.barrier()

    def _start_fp(self) -> None:
        """The warm-up table: the own rows of the seed's N(0, 0.1^2) whole table (as ``local.py``)."""
        cfg = self.config
        own = init_normal_rows(self.data.n_nodes, cfg.model.dim, self.owned_t)
        method = build_shard_method("fp", own, cfg.model.dim, None, cfg.model.num_layers, cfg.model.phi)
        self._new_shard(method, cfg.optim.lr)

    def _start_quantized(self) -> None:
        """The quantized method's shard, initialised from the warm-up's own rows (and, for dense
        parameters, from the whole warm-up table gathered)."""
        cfg = self.config
        fp = self.shard.method
        own = fp.weight.detach()[: self.shard.num_owned].clone()
        with torch.random.fork_rng():
            probe = build_method(cfg.model.method, 1, cfg.model.dim, cfg.model.bits, cfg.model.num_layers,
                                 **self.schedule.method_options(cfg))
        full = gather_latent(fp, self.partition, self.wire.gather) if probe.dense_params() else None
        method = build_shard_method(cfg.model.method, own, cfg.model.dim, cfg.model.bits, cfg.model.num_layers,
                                    full_table=full, **self.schedule.method_options(cfg), seed=cfg.seed)
        self._new_shard(method, cfg.optim.rate("quantized"))
        self.wire.allreduce_gather_bytes()
        del fp, own, full
        release_free_memory()

    # -- one step --------------------------------------------------------------------------
    def step(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, global_size: int) -> float:
        """One data-parallel step on this rank's positives (an :class:`~gnaq_dist.sampling.OwnedBatch`)
        of a global batch of ``global_size``; returns this rank's share of the global BPR loss."""
        if self._retain_freed_memory():  # from the first step on
            retain_freed_memory()
        self.positives += int(global_size)
        if self.halo is not None:
            return self._step_full(users, pos, neg, global_size)
        return self._step_sampled(users, pos, neg, global_size)

    def _retain_freed_memory(self) -> bool:
        """``retain_freed_memory``, where null means: on for batches of at most
        :data:`RETAIN_MAX_BATCH` positives, whose many short steps would each fault in fresh
        tables, off for larger ones, whose few long steps make transients of many sizes
        (batch shares, item tables) that a heap keeping freed blocks cannot reuse: it grows."""
        setting = self.config.retain_freed_memory
        if setting is None:
            return self.schedule.batch_size <= RETAIN_MAX_BATCH
        return bool(setting)

    def _backward(self, final_rows: torch.Tensor, rows: BatchRows, global_batch: int,
                  reg: torch.Tensor | None) -> float:
        """The ranking loss (BPR or softmax) of this rank's positives (``rows`` index ``final_rows``),
        normalised by the *global* batch, in one pass (:mod:`gnaq_dist.train.ranking_loss`), then one
        backward with the L2 term ``reg``."""
        sched = self.config.schedule
        bpr, grad = row_loss_gradient(final_rows, rows.users, rows.pos, rows.neg, global_batch, sched.loss,
                                      sched.temperature, sched.loss_chunk)
        if reg is None:
            torch.autograd.backward([final_rows], [grad])
        else:
            torch.autograd.backward([final_rows, reg], [grad, torch.ones_like(reg)])
        return float(bpr)

    def _step_sampled(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, global_batch: int) -> float:
        """Sampled blocks of this rank's batch nodes, over layer-0 rows fetched from their owners."""
        cfg = self.config
        shard = self.shard
        n_users = self.data.n_users
        pos_nodes, neg_nodes = pos + n_users, neg + n_users
        rows = batch_rows(users, pos_nodes, neg_nodes)
        batch_nodes = rows.nodes
        if batch_nodes.numel() and self.sampler is not None:
            input_nodes, blocks = self.sampler.sample(batch_nodes)
        else:
            input_nodes, blocks = batch_nodes, []
        server = shard.server()
        payload = fetch_rows(input_nodes, self.partition, server, counter=self.wire.train, decode=False)
        view = shard.view(server, payload)
        shard.zero_dense_grads()
        bias = self._fetch_bias(input_nodes[: batch_nodes.shape[0]])
        bpr_value = 0.0
        final = None
        if batch_nodes.numel():
            L = cfg.model.num_layers
            layers = propagate_blocks(blocks, view.embeddings, L, shard.method.layer_fn) if L else \
                [shard.method.layer_fn(view.embeddings, 0)]
            final = shard.method.combine(layers)
            scored = score_rows(final, bias, batch_nodes < n_users)
            reg = None
            if shard.method.uses_l2 and shard.format != "derived":
                x0 = view.embeddings[: batch_nodes.shape[0]]  # the seeds lead the input nodes
                reg = cfg.optim.l2 * 0.5 * (rows.counts.to(x0.dtype) * x0.pow(2).sum(1)).sum() / global_batch
            bpr_value = self._backward(scored, rows, global_batch, reg)
        extra = []
        if bias is not None:  # the seeds' bias gradients, as rows of the input nodes (the seeds lead)
            g = torch.zeros(input_nodes.shape[0], 1)
            if bias.grad is not None:
                g[: bias.shape[0], 0] = bias.grad
            extra.append(g)
        if shard.format == "derived" and shard.method.uses_l2:
            self._derived_l2(batch_nodes, rows.counts, global_batch)
        self._apply_gradients(view, input_nodes=input_nodes, extra=extra)
        if shard.format == "derived":  # the owners' latent update, from the dL/dx their rows received
            shard.update_latent(self.schedule.latent_lr_at(self.global_step))
        elif self._refine_now():
            self._refine(batch_nodes, final)
        self.global_step += 1
        return bpr_value

    def _derived_l2(self, batch_nodes: torch.Tensor, counts: torch.Tensor, global_batch: int) -> None:
        """Sampled blocks, derived rows: every rank sends its batch nodes' occurrence counts to their
        owners (one fp32 value a row, counted), and each owner computes its rows' L2 gradient in
        closed form (collective)."""
        msg = counts.to(torch.float32).reshape(-1, 1)
        rows, summed = push_row_gradients(batch_nodes, msg, self.partition, None, None, counter=self.wire.train)
        if rows.numel():
            self.shard.set_l2_gradient(rows, summed[:, 0] * (self.config.optim.l2 / global_batch),
                                       self.shard.own_rows(rows))

    def _fetch_bias(self, nodes: torch.Tensor) -> torch.Tensor | None:
        """The score biases of ``nodes`` from their owners, as a differentiable leaf (None: the
        method has none). Collective when it has."""
        own_bias = self.shard.method.bias_of(None)
        if own_bias is None:
            return None
        values = fetch_rows(nodes, self.partition, LatentShard([own_bias], 1), counter=self.wire.train)
        return values.reshape(-1).clone().requires_grad_(True)

    def _step_full(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, global_batch: int) -> float:
        """Full-graph propagation split by owner (:class:`.halo.HaloPlan`).

        A rank's positives are its own users', so their rows are its own final rows; every
        item's final row comes through one fixed exchange (:meth:`_item_exchange`). The loss
        adds its gradient into a table of the own rows and one of the items, the items' go
        back to their owners, and one backward runs through the propagation: memory follows
        the shard and the item count, not the batch. Every rank runs the whole forward and
        backward, even without a positive of its own: the exchanges inside them are collectives.
        """
        local_users = self.partition.local_of(users)
        occurrences = self._occurrences(local_users, pos, neg)
        if self._plain_rows():
            bpr = self._step_plain_rows(local_users, pos, neg, global_batch, occurrences)
        else:
            bpr = self._step_method_rows(local_users, pos, neg, global_batch, occurrences)
        self.global_step += 1
        return bpr

    def _plain_rows(self) -> bool:
        """Whether layer 0 is the shard's fp32 rows themselves (the fp method): its step then
        needs no autograd and no copy of the table (:meth:`_step_plain_rows`)."""
        method = self.shard.method
        return method.name == "fp" and method.linear_layers and self.config.model.num_layers > 0

    def _step_plain_rows(self, local_users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                         global_batch: int, occurrences: torch.Tensor) -> float:
        """The full step of fp rows, its gradient in closed form: the propagation reads the
        weight in place, its backward (:meth:`.HaloPlan.mean_backward`) leaves the own rows'
        gradient in a kept table, the L2 term's ``l2 * count * x / B`` is added there, the halo
        rows' gradients come back from the other ranks into it, and Adam steps from it. The
        tables a step holds: the weight, Adam's two moments and the plan's three own-row
        buffers (the generic path adds the layer-0 copy, autograd's gradients and their sums)."""
        cfg, shard, plan = self.config, self.shard, self.halo
        weight = shard.method.weight.detach()
        out_buf = plan.step_buffer("output", weight)
        final_own = plan.mean_of_own_rows(weight, cfg.model.num_layers, self.wire.train, out=out_buf)
        bpr, _, grad_own = self._final_row_gradient(final_own, out_buf, local_users, pos, neg, global_batch)
        g_own, g_halo = plan.mean_backward(grad_own, cfg.model.num_layers, self.wire.train)
        coef = occurrences.to(torch.float32).mul_(cfg.optim.l2 / global_batch)
        g_own.addcmul_(weight, coef.unsqueeze(1))
        (comp,), (ef,) = self.compressors, self.feedback
        g_own = plan.exchange.push_gradients(g_halo, plan.n_own, comp, ef, counter=self.wire.train, out=g_own,
                                             accumulate=True, scratch=True)
        shard.apply_row_gradients(None, [g_own], cfg.optim.grad_clip)
        return bpr

    def _step_method_rows(self, local_users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                          global_batch: int, occurrences: torch.Tensor) -> float:
        """The full step of any method: layer 0 from the method's wire rows (own and halo, the
        same rounding for every W), autograd from the final rows back to the row parameters."""
        cfg = self.config
        shard, plan = self.shard, self.halo
        server = shard.server()
        own_rows = server.serve(torch.arange(plan.n_own, dtype=torch.int64))
        payload = torch.cat([own_rows, plan.exchange.pull_wire_rows(server, self.wire.train)])
        del own_rows  # (n_own, row bytes) no longer needed
        # With plain layers, tables kept from step to step (fresh ones cost their page faults
        # every step): the layer-0 rows, then their gradient; the final rows; their gradient.
        x_buf = out_buf = None
        if shard.method.linear_layers:
            like = torch.empty((0, shard.method.dim))
            x_buf, out_buf = plan.step_buffer("input", like), plan.step_buffer("output", like)
        view = shard.view(server, payload, out=x_buf)
        del payload  # what the view needs of it, it holds (latent rows: their own copies)
        shard.zero_dense_grads()
        reg = None
        derived = shard.format == "derived"
        if shard.method.uses_l2 and not derived:
            reg = cfg.optim.l2 * 0.5 * shard.row_l2(view, occurrences.to(torch.float32)) / global_batch
        x_input = view.pop_embeddings()
        if shard.method.uses_l2 and derived:  # its own rows' L2 gradient, at the owner in closed form
            l2_rows = torch.nonzero(occurrences).squeeze(1)
            shard.set_l2_gradient(l2_rows, occurrences[l2_rows].to(torch.float32) * (cfg.optim.l2 / global_batch),
                                  x_input.detach()[l2_rows])
        bias = shard.method.bias_of(None)
        if x_buf is not None and (x_input.shape[1] != x_buf.shape[1] or bias is not None):
            x_buf = out_buf = None  # rows wider than d (a latent, or the score bias's columns): fresh tables
        final_own = final_own_rows(plan, shard.method, x_input, cfg.model.num_layers, self.wire.train, out=out_buf,
                                   grad_input=x_buf)
        del x_input
        if bias is not None:
            bias = bias.detach()[: plan.n_own].clone().requires_grad_(True)
            final_own = score_rows(final_own, bias, self.owned_t < self.data.n_users)
        bpr, own, grad_own = self._final_row_gradient(final_own, out_buf, local_users, pos, neg, global_batch)
        refine_rows = None
        if self._refine_now():  # every own row's final embedding, taken before the backward overwrites the buffers
            refine_rows = own[:, : shard.method.dim].clone()
        del own
        if reg is None:
            torch.autograd.backward([final_own], [grad_own])
        else:
            torch.autograd.backward([final_own, reg], [grad_own, torch.ones_like(reg)])
        del final_own
        extra = [] if bias is None else [bias.grad if bias.grad is not None else torch.zeros_like(bias)]
        self._apply_gradients(view, plan=plan, extra=extra)
        if shard.format == "derived":  # each owner updates its rows' latent; the halo reads the new codes next step
            shard.update_latent(self.schedule.latent_lr_at(self.global_step))
        if refine_rows is not None:
            # Each rank re-assigns its own rows' codes from the forward it just ran: no bytes move
            # here; the halo copies on other ranks get the new codes with the next step's pull.
            self.shard.refine(None if plan.n_own == self.shard.method.num_nodes else
                              torch.arange(plan.n_own, dtype=torch.int64), refine_rows)
        return bpr

    def _final_row_gradient(self, final_own: torch.Tensor, out_buf: torch.Tensor | None, local_users: torch.Tensor,
                            pos: torch.Tensor, neg: torch.Tensor,
                            global_batch: int) -> tuple[float, torch.Tensor, torch.Tensor]:
        """The ranking loss (BPR or softmax) of this rank's positives on the final rows: ``(loss, own final rows, their
        gradient)``, the items' gradients already summed in from every rank. With ``out_buf``
        (the final rows' kept table), the rows move to a plan table idle until the backward and
        ``out_buf`` becomes their gradient."""
        plan = self.halo
        items = self._item_exchange().pull_rows(final_own.detach(), self.wire.train)  # (n_items, d): item i's row
        if out_buf is not None:
            own = plan.idle_own_buffer(out_buf).copy_(out_buf)
            grad_own = out_buf.zero_()
        else:
            own, grad_own = final_own.detach(), torch.zeros_like(final_own)
        grad_items = torch.zeros((self.data.n_items, own.shape[1]), dtype=own.dtype)
        sched = self.config.schedule
        bpr = row_loss_into(own, items, local_users, pos, neg, global_batch, grad_own, grad_items, sched.loss,
                            sched.temperature, sched.loss_chunk)
        del items
        self._item_exchange().push_gradients(grad_items, plan.n_own, counter=self.wire.train, kind="activations",
                                             out=grad_own, accumulate=True)
        return float(bpr), own, grad_own

    def _item_exchange(self) -> FixedExchange:
        """Every item's final row from its owner, and its gradient back: one plan for the run
        (collective when first made). A step of many positives touches nearly every item."""
        if self._items is None:
            n_users, n = self.data.n_users, self.partition.num_nodes
            self._items = FixedExchange(torch.arange(n_users, n, dtype=torch.int64), self.partition,
                                        counter=self.wire.train, what="the items' final rows")
        return self._items

    def _occurrences(self, local_users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """How often each own row occurs in the global batch (its L2 weight): the own users'
        counts here, the items' summed over ranks (one all_reduce of n_items counts)."""
        plan, n_users = self.halo, self.data.n_users
        items = torch.bincount(pos, minlength=self.data.n_items)
        items += torch.bincount(neg.reshape(-1), minlength=self.data.n_items)
        if self.world > 1:
            items = allreduce_sum(items, self.wire.train)
        out = torch.bincount(local_users, minlength=plan.n_own)
        own_items = self.owned_t >= n_users
        out[own_items] += items[self.owned_t[own_items] - n_users]
        return out

    def _apply_gradients(self, view, *, input_nodes: torch.Tensor | None = None, plan: HaloPlan | None = None,
                         extra: list[torch.Tensor] | None = None) -> None:
        """Push the layer-0 rows' gradients to their owners (low-bit), step the owners' rows and
        the all-reduced dense parameters. The view's rows are ``input_nodes``, or with a halo
        plan own + halo rows: own rows' gradients stay here, the halo's go through the plan.
        ``extra``: gradients of the shard's extra row parameters (the score bias), rows of
        ``input_nodes`` (pushed to their owners in fp32), or with a plan every own row."""
        shard = self.shard
        clip = self.config.optim.grad_clip
        local_rows = None  # with a plan: every own row, in order
        summed = []
        for g, comp, ef in zip(shard.leaf_grads(view), self.compressors, self.feedback):
            if plan is not None:  # the halo's rows go to their owners; the own rows' sums land in g[:n]
                n = plan.n_own
                own_g = g[:n].detach().float()
                g_i = plan.exchange.push_gradients(g[n:], n, comp, ef, counter=self.wire.train, out=own_g,
                                                   accumulate=True, scratch=True)
            else:
                rows_i, g_i = push_row_gradients(input_nodes, g, self.partition, comp, ef, counter=self.wire.train)
                if local_rows is not None and not torch.equal(local_rows, rows_i):
                    raise RuntimeError("row gradient messages disagree on the touched rows")
                local_rows = rows_i
            summed.append(g_i)
        extra_summed = []
        for g in extra or []:
            if plan is not None:
                extra_summed.append(g)
                continue
            rows_i, g_i = push_row_gradients(input_nodes, g, self.partition, None, None, counter=self.wire.train)
            if local_rows is not None and not torch.equal(local_rows, rows_i):
                raise RuntimeError("row gradient messages disagree on the touched rows")
            extra_summed.append(g_i)
        shard.apply_row_gradients(local_rows, summed, clip, extra_summed)
        if shard.dense:
            allreduce_dense([p.grad for p in shard.dense], counter=self.wire.train)
            for p in shard.dense:
                p.grad.mul_(self.world)  # allreduce_dense averages; the loss is already global
            shard.apply_dense(clip)

    def _out_of_time(self, budget: TimeBudget) -> bool:
        """Whether the wall-clock budget is spent, agreed by every rank (their clocks differ)."""
        if budget.seconds is None:
            return False
        if self.world == 1:
            return budget.spent()
        return bool(allreduce_sum(torch.tensor([1 if budget.spent() else 0], dtype=torch.int64)) > 0)

    def _quant_figures(self, codes_before: torch.Tensor | None) -> dict[str, float]:
        """The epoch's share of changed codes and layer-0 error over every rank's rows
        (:mod:`gnaq_dist.quant.drift`; one all_reduce, collective)."""
        sums = epoch_sums(self.shard.method, codes_before, self.level_dtype)
        if self.shard.num_owned == 0:  # a placeholder row: no codes, no error, same flags
            sums[:4] = 0
        if self.world > 1:
            sums = allreduce_sum(sums)
            sums[4:] = (sums[4:] > 0).to(sums.dtype)
        return epoch_fields(sums)

    def _refine_now(self) -> bool:
        """Whether this step re-assigns codes from the propagated rows (a latent's update is not that)."""
        every = self.config.model.refine_steps
        return bool(every) and self.shard.method.refines and self.shard.format == "packed" \
            and (self.global_step + 1) % every == 0

    def _refine(self, batch_nodes: torch.Tensor, final: torch.Tensor | None) -> None:
        """Sampled blocks: owners re-assign codes of the step's batch nodes (the only rows
        propagated) from the requesters' propagated rows (counted as ``refine`` bytes).

        Each requester sends ``[h, 1]`` for its seeds (fp32, uncompressed); an owner that gets
        a node from several ranks averages them (identical at fan-out -1).
        """
        d = self.config.model.dim
        h = final.detach() if final is not None else torch.zeros(0, d)
        if h.shape[1] != d:
            raise GnaqInputError("refinement needs final embeddings of dimension d")
        msg = torch.cat([h, torch.ones(h.shape[0], 1)], dim=1)
        rows, summed = push_row_gradients(batch_nodes, msg, self.partition, None, None, counter=self.wire.refine)
        if rows.numel():
            self.shard.refine(rows, summed[:, :d] / summed[:, d:])

    # -- logging -------------------------------------------------------------------------------
    def _emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Log ``event``, keep it in the history and report it (on every rank: a barrier under Ray)."""
        record = self.log.write(event, **fields)
        self.history.append(record)
        if self.report is not None:
            self.report(record)
        if event == "eval" and self.rank == 0 and self.config.progress:  # a run's progress, as local.py shows it
            tqdm.write(f"epoch {fields.get('epoch')} [{fields.get('phase')}] step {fields.get('step')} " + "  ".join(
                f"{k}={v:.4f}" for k, v in fields.items() if k.startswith(("recall@", "ndcg@"))))
        return record

    # -- checkpoints and evaluation (collective) -------------------------------------------------
    def save_checkpoint(self, epoch: int, phase: str) -> str:
        """Collective: every rank writes its shard, rank 0 the replicated parts and, last, the
        manifest (:meth:`.checkpointing.RankCheckpoints.save`); returns the checkpoint's URI."""
        if self.halo is not None:
            self.halo.release_buffers()  # the shard's Parquet bytes take their place
        uri = self.checkpoints.save(step=self.global_step, epoch=epoch, phase=phase, shard=self.shard,
                                    feedback=self.feedback, partition=self.partition, positives=self.positives,
                                    history=self.history)
        self._last_checkpoint_step = self.global_step
        self._emit("checkpoint", epoch=epoch, phase=phase, step=self.global_step, uri=uri)
        return uri

    def evaluate(self) -> tuple[dict[str, float], dict[str, float]]:
        """Metrics (the same on every rank) and the storage report of the whole table, split or
        gathered (:func:`.evaluation.evaluate`; collective)."""
        return evaluate_run(self)
    # -- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train the whole schedule (from the resumed checkpoint, if any); the summary :func:`train_worker` returns."""
        cfg = self.config
        sched = cfg.schedule
        plan = self.schedule
        warmup_epochs = plan.warmup_epochs
        total_steps = plan.total_steps
        budget = TimeBudget(sched.max_minutes)
        times = PhaseTimes()
        step_times: list[tuple[float, int]] = []  # (seconds, positives) of every step of this run
        metrics: dict[str, float] = {}
        storage: dict[str, float] = {}
        every = cfg.checkpoint.every_epochs
        self._last_checkpoint_step = -1
        resumed = None
        self.history.append(self.log.write(
            "start", method=cfg.model.method, bits=cfg.model.bits, n_users=self.data.n_users,
            n_items=self.data.n_items, n_train=self.n_train, steps_per_epoch=self.steps_per_epoch,
            batch_size=plan.batch_size, epochs=sched.epochs, warmup_epochs=warmup_epochs if cfg.quantized else 0,
            max_minutes=sched.max_minutes, world_size=self.world,
            **({"latent_lr": self.schedule.latent_lr, "latent_decay": plan.latent_decay} if self.schedule.latent_lr is not None else {})))
        if self.resume is not None:
            restored = self.checkpoints.restore(self.resume, self.partition, self._new_shard)
            self.global_step, self.positives, self.history = restored.step, restored.positives, restored.history
            m = self.resume.manifest
            phase, first_epoch = m["phase"], int(m["epoch"]) + 1
            self._last_checkpoint_step = self.global_step
            resumed = {"uri": self.resume.uri, "step": self.global_step, "epoch": int(m["epoch"]),
                       "world_size_then": int(m["world_size"])}
            log.info("resumed from %s (epoch %d, step %d, written by %d workers)", self.resume.uri, m["epoch"],
                     self.global_step, m["world_size"])
            if cfg.checkpoint.eval_on_resume:
                metrics, storage = self.evaluate()
                self._emit("eval", epoch=int(m["epoch"]), phase="resume", step=self.global_step, **metrics)
        else:
            self._start_fp()
            phase, first_epoch = "fp", 1
        epoch = first_epoch - 1
        bar = tqdm(total=total_steps, initial=min(self.global_step, total_steps), unit="step", mininterval=1.0,
                   desc=f"{cfg.model.method} W={self.world}", disable=not (cfg.progress and self.rank == 0))
        budget.start()
        out_of_time = False
        for epoch in range(first_epoch, sched.epochs + 1):
            if plan.steps_done(self.global_step) or out_of_time:
                break
            # Each epoch's randomness (neighbour sampling, stochastic rounding) restarts from
            # (seed, epoch): a run resumed at an epoch boundary continues as if never stopped.
            seed_everything(cfg.seed * 100_003 + epoch)
            for i, comp in enumerate(self.compressors):
                comp.reseed((cfg.seed * 1_000_003 + self.rank * 101 + i) * 100_003 + epoch)
            if phase == "fp" and plan.quantize_at(epoch):
                self._start_quantized()
                phase = "quantized"
            lr = cfg.optim.rate(phase) * plan.lr_factor(epoch)  # optim.lr_decay: the epoch's rate
            self.shard.set_lr(lr)
            self._reserve_step_tables()  # setup's one-off page faults, not the first step's
            t0 = time.perf_counter()
            loss_sum, steps, positives_before = 0.0, 0, self.positives
            self.batches.set_epoch(epoch)
            codes_before = self.shard.method.code_state()
            for batch in self.batches:
                if plan.steps_done(self.global_step):
                    break
                if self._out_of_time(budget):
                    out_of_time = True
                    if self.rank == 0:
                        bar.write(f"time limit: {sched.max_minutes:g} min reached after {self.global_step} steps")
                    break
                t_step = time.perf_counter()
                loss_sum += self.step(*batch)
                step_times.append((time.perf_counter() - t_step, batch.global_size))
                steps += 1
                bar.update(1)
            seconds = time.perf_counter() - t0
            if not steps:  # the budget ran out before this epoch's first step
                epoch -= 1
                break
            times.add_epoch(phase, seconds, steps)
            loss, wire = self.wire.allreduce_epoch(loss_sum, steps, self.world)
            bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
            self._emit("epoch", epoch=epoch, phase=phase, loss=loss, seconds=seconds, step=self.global_step,
                       steps=steps, elapsed=budget.elapsed(), lr=lr,
                       positives_per_s=(self.positives - positives_before) / max(seconds, 1e-9),
                       **self._quant_figures(codes_before))
            self._emit("wire", epoch=epoch, phase=phase, **wire)
            last = plan.last_epoch(epoch, self.global_step, out_of_time)
            if last and plan.quantize_at_end(phase):
                break  # the budget ended inside the warm-up: quantize first (below)
            if last or plan.evaluate_after(epoch):
                t1 = time.perf_counter()
                metrics, storage = self.evaluate()
                times.seconds["eval"] += time.perf_counter() - t1
                self._emit("eval", epoch=epoch, phase=phase, step=self.global_step,
                           train_seconds=times.train_seconds(), **metrics)
            if every and (last or epoch % every == 0):
                self.save_checkpoint(epoch, phase)
            if self.report is not None:  # the epoch's records are all out (Ray Train: one report an epoch)
                self.report({"event": "epoch_end", "epoch": epoch})
        bar.close()
        if plan.quantize_at_end(phase):
            self._start_quantized()
            phase = "quantized"
            metrics = {}
        evaluated = any(r.get("event") == "eval" and r.get("step") == self.global_step for r in self.history[-3:])
        if plan.evaluate_at_end(metrics, evaluated):  # a time limit, a warm-up cut short
            metrics, storage = self.evaluate()
            self._emit("eval", epoch=epoch, phase=phase, step=self.global_step,
                       train_seconds=times.train_seconds(), **metrics)
        keep = bool(every) or self.final_checkpoint
        if keep and self._last_checkpoint_step != self.global_step:
            self.save_checkpoint(epoch, phase)
        train_seconds = times.train_seconds()
        checkpoint = (self.history[-1]["uri"] if keep and self.history
                      and self.history[-1].get("event") == "checkpoint" else None)
        # The closing record a local run also writes (not reported: it is not a barrier).
        self.history.append(self.log.write("end", metrics=metrics, phase_seconds=times.seconds,
                                           phase_epochs=times.epochs, seconds_per_epoch=times.seconds_per_epoch(),
                                           storage=storage))
        return {
            "metrics": metrics,
            "history": self.history,
            "phase_seconds": times.seconds,
            "phase_epochs": times.epochs,
            "phase_steps": times.steps,
            "seconds_per_epoch": times.seconds_per_epoch(),
            "seconds_per_step": times.seconds_per_step(),
            "edges_per_second": self.positives / max(train_seconds, 1e-9),
            "steady": steady_throughput(step_times),
            "storage": storage,
            "wire": self.wire.summary(self.global_step),
            "partition": self.partition.describe(),
            # What this rank's memory follows: the rows it propagates (own + halo) and its non-zeros.
            "shard": self.halo.describe() if self.halo is not None else {"own_nodes": int(self.owned_t.shape[0])},
            "rows": self.shard.row_counts(),
            "memory": self.shard.memory(),
            "rank": self.rank,
            "world_size": self.world,
            "steps": self.global_step,
            "resumed_from": resumed,
            "checkpoint": checkpoint,
            **({"latent_lr": self.schedule.latent_lr} if self.schedule.latent_lr is not None else {}),
        }

def train_worker(config: TrainConfig, data: InteractionData | None = None, report: Report | None = None,
                 resume_hint: ResumeHint | None = None, final_checkpoint: bool = False,
                 prune_checkpoints: bool = True) -> dict:
    """Train ``config`` as this rank of the default process group; every rank returns the same
    metrics, phase times, storage report and wire summary (plus its own ``rows`` and ``rank``).

    ``report(record)`` gets every log record (``epoch``, ``wire``, ``eval``, ``checkpoint``) and,
    after each epoch's, an ``{"event": "epoch_end"}`` mark, on every rank the same number of times
    (Ray Train's ``report`` is a barrier). ``final_checkpoint``: write a checkpoint at the end even
    with ``checkpoint.every_epochs`` 0 (what ``gnaq train`` asks for). ``prune_checkpoints``: keep
    only ``checkpoint.keep_last`` (False under Ray Train, whose CheckpointConfig decides).
    """
    return DistributedTrainer(config, data, report, resume_hint, final_checkpoint, prune_checkpoints).run()


__all__ = ["DistributedTrainer", "train_worker"]
