"""Training configuration: model, method, optimisation and schedule.

One dataclass tree, loaded from layered YAML (see ``gnaq_dist.config``); every key is
documented in ``docs/config.md``. ``validate`` rejects a config that contradicts
itself before any data is read or any training starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from gnaq_dist.errors import ConfigError, GnaqInputError
from gnaq_dist.methods import GNAQ_VARIANTS, METHODS, QUANT_BITS

#: Methods the distributed loop refuses, and why.
DISTRIBUTED_UNSUPPORTED = {
    "bigear": "its distillation ranks every item for each user against the whole fp teacher",
}
MAX_SEED = 2**32 - 1  # numpy's legacy seed (np.random.seed) takes 0 .. 2**32 - 1


def _finite(key: str, value: float | None, *, low: float = 0.0, strict: bool = False, none_ok: bool = False) -> None:
    """``value`` is a finite number >= ``low`` (> ``low`` when ``strict``); YAML's .nan and
    .inf parse as floats, and a NaN passes every ``<`` test."""
    if value is None:
        if none_ok:
            return
        raise ConfigError(f"{key}: null is not allowed")
    bound = f"> {low:g}" if strict else f">= {low:g}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)  # a dataclass set directly skips coercion
    if not number or not math.isfinite(value) or value < low or (strict and value == low):
        raise ConfigError(f"{key}: {value!r} must be a finite number {bound}" + (" or null" if none_ok else ""))


@dataclass
class ModelConfig:
    method: str = "gnaq"  # fp | gnaq (the reference code) | gnaq_static (frozen codes) | gnaq_ste | gnaq_lat (an integer latent drives the codes) | lsq | n2uq | bigear
    bits: int | None = 2  # code width of the quantized table: 1, 2, 4 or 8 (fp: null)
    dim: int = 64  # embedding dimension d
    num_layers: int = 3  # LightGCN propagation layers L
    phi: Literal["tanh", "identity"] | None = None  # GNAQ level activation; null: the variant's own (gnaq: tanh, gnaq_static and gnaq_ste: identity)
    level_dtype: Literal["float16", "float32"] = "float16"  # dtype of stored levels
    refine_every: int | None = None  # GNAQ: optimizer steps between re-assignments of every node's codes from its propagated embedding in the step's forward (0 = never); null: the variant's own (gnaq: 1, gnaq_static: 0)
    latent_bits: int | None = None  # gnaq_lat: bits a dimension of the integer latent that drives the codes (2, 4 or 8, >= bits), held packed; null: the variant's own (4); other methods ignore it
    latent_lr: float | Literal["auto"] = "auto"  # gnaq_lat: the latent's step, as a fraction of its integer range, for a gradient of the row's RMS size; auto: model.latent_budget / the quantized optimizer steps the run plans (quantized epochs x steps an epoch, max_steps included), so a run of few large steps takes larger latent steps than one of many small ones; a number sets it; with latent_decay=cosine either is the mean step over the run; other methods ignore it
    latent_budget: float = 12.0  # gnaq_lat with latent_lr=auto: the mean latent step times the run's quantized steps, i.e. how many times over the run a row-RMS gradient would carry a latent value across its range (chosen on the validation splits of Last.fm and Gowalla: docs/method.md)
    latent_decay: Literal["cosine", "none"] = "cosine"  # gnaq_lat: the latent step over the quantized phase: cosine: latent_lr x (1 + cos(pi t / T)) at quantized step t of T planned, from twice the step down to 0 (mean: latent_lr, so latent_budget keeps its meaning), fast moves early and settled codes late; none: constant
    lsq_step: Literal["tensor", "node"] = "tensor"  # LSQ's learned step: one for the whole table, or one per node (a grid of its own per row, stored as 2^b levels a node: 24 bytes at d = 64, b = 2, fp16 levels); other methods ignore it

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"model.method: unknown method {self.method!r} (known: {', '.join(METHODS)})")
        if self.method == "fp":
            if self.bits not in (None, 32):
                raise ConfigError(f"model.bits: full precision takes no bit width, got {self.bits}")
        elif self.method == "bigear":
            if self.bits not in (None, 1):
                raise ConfigError(f"model.bits: bigear is 1-bit only, got {self.bits}")
        elif self.bits not in QUANT_BITS:
            raise ConfigError(f"model.bits: {self.bits!r} is not a supported bit width (1, 2, 4, 8)")
        if self.dim < 1 or self.num_layers < 0:
            raise ConfigError("model.dim must be >= 1 and model.num_layers >= 0")
        if self.refine_every is not None and self.refine_every < 0:
            raise ConfigError(f"model.refine_every must be >= 0 or null, got {self.refine_every}")
        if self.latent_bits is not None and self.latent_bits not in (2, 4, 8):
            raise ConfigError(f"model.latent_bits: {self.latent_bits!r} must be 2, 4, 8 or null")
        if self.latent_bits is not None and self.bits is not None and self.latent_bits < self.bits \
                and GNAQ_VARIANTS.get(self.method, None) is not None and GNAQ_VARIANTS[self.method].latent_bits:
            raise ConfigError(f"model.latent_bits: {self.latent_bits} is below the code width model.bits={self.bits}")
        if isinstance(self.latent_lr, str):
            if self.latent_lr != "auto":
                raise ConfigError(f"model.latent_lr: {self.latent_lr!r} must be a number > 0 or auto")
        else:
            _finite("model.latent_lr", self.latent_lr, strict=True)
        _finite("model.latent_budget", self.latent_budget, strict=True)
        if self.latent_decay not in ("cosine", "none"):
            raise ConfigError(f"model.latent_decay: {self.latent_decay!r} is not one of cosine, none")
        spec = GNAQ_VARIANTS.get(self.method)
        if spec is not None and spec.latent_bits and self.refine_every not in (None, 1):
            raise ConfigError(f"model.refine_every: {self.method} applies its latent update after every step "
                              f"(null or 1), got {self.refine_every}")
        if self.lsq_step not in ("tensor", "node"):
            raise ConfigError(f"model.lsq_step: {self.lsq_step!r} is not one of tensor, node")

    @property
    def refine_steps(self) -> int:
        """Steps between code refinements: ``refine_every``, or the method's own when null (0: never)."""
        if self.refine_every is not None:
            return self.refine_every
        spec = GNAQ_VARIANTS.get(self.method)
        return spec.refine_every if spec is not None and not spec.straight_through else 0

    def latent_step(self, quantized_steps: int) -> float:
        """``gnaq_lat``'s latent step for a run that plans ``quantized_steps`` quantized optimizer
        steps: ``latent_lr`` when a number, else ``latent_budget / quantized_steps`` (at least one
        step counted, so a run quantized only at its end gets a finite step). With
        ``latent_decay: cosine`` this is the mean step (:meth:`Schedule.latent_factor`)."""
        if self.latent_lr != "auto":
            return float(self.latent_lr)
        return float(self.latent_budget) / max(1, int(quantized_steps))

    def method_options(self, quantized_steps: int) -> dict[str, Any]:
        """What ``build_method`` takes from this config (each method uses its own), for a run that
        plans ``quantized_steps`` quantized steps (``Schedule.quantized_steps``): both trainers
        build their methods from this, so ``latent_lr: auto`` resolves the same way in each."""
        return {"phi": self.phi, "per_row": self.lsq_step == "node", "latent_bits": self.latent_bits,
                "latent_lr": self.latent_step(quantized_steps)}


@dataclass
class OptimConfig:
    lr: float = 0.05  # Adam learning rate of the full-precision warm-up (large batches take a large rate)
    quant_lr: float | None = 0.01  # Adam learning rate of the quantized phase (null: lr)
    lr_decay: Literal["none", "cosine"] = "none"  # within each phase, epoch by epoch: none (constant), or cosine from the phase's rate at its first epoch down to lr_final times it at its last
    lr_final: float = 0.1  # cosine only: the last epoch's rate of a phase, as a fraction of the phase's rate
    l2: float = 1e-4  # L2 on the batch's layer-0 embeddings (LightGCN's decay); not applied by gnaq, whose reference uses none
    grad_clip: float | None = 3.0  # gradient value clip (the reference code's 3); null = off

    def rate(self, phase: str) -> float:
        """The learning rate a phase starts from: ``lr`` for ``"fp"``, else ``quant_lr`` (or ``lr``)."""
        return self.lr if phase == "fp" else (self.quant_lr or self.lr)

    def validate(self) -> None:
        _finite("optim.lr", self.lr, strict=True)
        _finite("optim.quant_lr", self.quant_lr, strict=True, none_ok=True)
        _finite("optim.l2", self.l2)
        if not (math.isfinite(self.lr_final) and 0.0 < self.lr_final <= 1.0):
            raise ConfigError(f"optim.lr_final must be in (0, 1], got {self.lr_final}")
        _finite("optim.grad_clip", self.grad_clip, strict=True, none_ok=True)


@dataclass
class EarlyStoppingConfig:
    patience: int = 0  # stop after this many evaluations (schedule.eval_every apart) without a better metric on split, and keep the best evaluation's tables (0 = off); counted in the run's last phase only (the quantized one of a quantized method)
    metric: str = "ndcg@20"  # what decides the best evaluation: recall@K or ndcg@K, K one of eval.ks
    split: Literal["valid", "test"] = "valid"  # held-out split the metric is computed on (the reported metrics stay on eval.split)

    def validate(self) -> None:
        if self.patience < 0:
            raise ConfigError(f"schedule.early_stopping.patience must be >= 0, got {self.patience}")
        name, _, k = self.metric.partition("@")
        if name not in ("recall", "ndcg") or not k.isdigit() or int(k) < 1:
            raise ConfigError(f"schedule.early_stopping.metric: {self.metric!r} is not recall@K or ndcg@K")


@dataclass
class ScheduleConfig:
    epochs: int = 40  # total epochs (warm-up included)
    warmup_epochs: int = 20  # full-precision epochs before the quantized phase (ignored for fp)
    steps_per_epoch: int = 4  # optimizer steps per epoch, one propagation each: a step's batch is ceil(train edges / steps_per_epoch) positives, so an epoch costs a few propagations whatever the graph's size
    batch_size: int | None = None  # positive (user, item) pairs per step instead (null: from steps_per_epoch); small batches make an epoch cost train edges / batch_size propagations
    loss_chunk: int = 65536  # positives the torch fallback of the loss scores at once (numba's kernel holds one at a time): bounds the loss's memory, never the gradient
    num_negatives: int = 4  # sampled negatives per positive
    loss: Literal["bpr", "softmax"] = "bpr"  # bpr: mean softplus(negative - positive score) over pairs; softmax: sampled softmax, the positive's cross-entropy among itself and its negatives (hard negatives weigh more)
    temperature: float = 1.0  # softmax only: scores are divided by it (lower: sharper focus on the hardest negatives)
    propagation: Literal["full", "sampled"] = "full"  # full graph per step (split by owner over workers), or DGL neighbour sampling
    fanouts: list[int] = field(default_factory=lambda: [10, 10, 10])  # per layer (-1 = all)
    eval_every: int = 5  # epochs between evaluations (0 = only at the end)
    max_steps: int | None = None  # stop after this many steps in total (smoke runs)
    max_minutes: float | None = None  # wall-clock budget of the training loop: at it, training stops, then evaluates and writes the final checkpoint (null: none)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)  # stop when a held-out metric stops improving (one-process trainer)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError("schedule.epochs must be >= 1")
        if self.warmup_epochs < 0:
            raise ConfigError("schedule.warmup_epochs must be >= 0")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(
                f"schedule.warmup_epochs ({self.warmup_epochs}) is longer than the run "
                f"(schedule.epochs = {self.epochs})"
            )
        if (self.batch_size is not None and self.batch_size < 1) or self.num_negatives < 1:
            raise ConfigError("schedule.batch_size (or null) and schedule.num_negatives must be >= 1")
        if self.steps_per_epoch < 1:
            raise ConfigError(f"schedule.steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        _finite("schedule.temperature", self.temperature, strict=True)
        if self.loss_chunk < 1:
            raise ConfigError(f"schedule.loss_chunk must be >= 1, got {self.loss_chunk}")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ConfigError(f"schedule.max_minutes must be a finite number > 0 or null, got {self.max_minutes}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"schedule.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.eval_every < 0:
            raise ConfigError(f"schedule.eval_every must be >= 0, got {self.eval_every}")
        self.early_stopping.validate()
        if self.early_stopping.patience and not self.eval_every:
            raise ConfigError("schedule.early_stopping.patience needs periodic evaluations (schedule.eval_every >= 1)")
        bad = [f for f in self.fanouts if f == 0 or f < -1]
        if bad:
            raise ConfigError(f"schedule.fanouts: {bad[0]} is not a fanout (>= 1, or -1 for all neighbours)")


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20, 50])  # cut-offs of Recall@K / NDCG@K
    batch_size: int = 2048  # users scored at once (bounds memory to batch x items)
    split: Literal["test", "valid"] = "test"  # which held-out split to rank
    max_users: int | None = None  # rank a fixed random sample of this many users (null: every user with a held-out item)

    def validate(self) -> None:
        if not self.ks or min(self.ks) < 1 or self.batch_size < 1:
            raise ConfigError("eval.ks must be positive cut-offs and eval.batch_size >= 1")
        if self.max_users is not None and self.max_users < 1:
            raise ConfigError(f"eval.max_users must be >= 1 or null, got {self.max_users}")


@dataclass
class DistributedConfig:
    workers: int = 1  # data-parallel workers (ranks); each owns ~1/W of the embedding rows
    partition: Literal["metis", "hash"] = "metis"  # row owners: METIS cut (hash if it fails or W = 1) or keyed hash
    partition_file: str | None = None  # URI written by `gnaq partition` for this dataset and W: ranks read the owners instead of rank 0 partitioning at setup (METIS reads the whole graph)
    grad_bits: int | None = None  # bits of row gradients sent to their owners: 2, 4, 8 or null (fp32, exact)
    stochastic_rounding: bool = False  # unbiased stochastic rounding of compressed gradients (seed + rank)
    error_feedback: bool = True  # carry each compressed row's residual into its next message (only with grad_bits)
    placement: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # Ray placement of the workers (STRICT_SPREAD: one per node)
    shared_memory_dir: str | None = "/dev/shm"  # tmpfs where workers on one host share the halo's activation rows instead of sending them through gloo (used when every worker can map every other's; else, or null, the process group carries them)

    def validate(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"distributed.workers must be >= 1, got {self.workers}")
        if self.grad_bits not in (None, 2, 4, 8):
            raise ConfigError(f"distributed.grad_bits: {self.grad_bits!r} is not one of 2, 4, 8 or null")


@dataclass
class CheckpointConfig:
    dir: str | None = None  # URI of the checkpoint root (local, memory://, s3://...); null: <out>/checkpoints
    every_epochs: int = 0  # also write a sharded checkpoint every N epochs (0: none); gnaq train always writes one at the end of training
    keep_last: int = 3  # complete checkpoints to keep (older ones are deleted); on Ray Train, CheckpointConfig(num_to_keep=keep_last) unless a RunConfig gives its own
    resume: str = "auto"  # auto (with every_epochs > 0: newest complete checkpoint under dir; 0: start afresh), never, or a checkpoint URI
    eval_on_resume: bool = True  # evaluate right after loading (the metrics of the checkpoint, on this W)
    max_failures: int = 0  # Ray Train restarts of the worker group after a worker dies (FailureConfig)

    def validate(self) -> None:
        if self.every_epochs < 0 or self.keep_last < 1 or self.max_failures < 0:
            raise ConfigError("checkpoint.every_epochs and checkpoint.max_failures must be >= 0, "
                              "checkpoint.keep_last >= 1")
        if not self.resume:
            raise ConfigError("checkpoint.resume must be auto, never or a checkpoint URI")


@dataclass
class TrainConfig:
    dataset: str = ""  # URI of an ingested dataset (gnaq ingest output)
    storage_options: dict = field(default_factory=dict)  # fsspec options for dataset, out and checkpoint.dir (e.g. an S3 endpoint_url; credentials are better left to the environment: this config is copied into summary.json and every checkpoint manifest)
    out: str = "runs/latest"  # where the run writes metrics.jsonl, summary.json, checkpoints/ (with Ray workers, Ray Train's run files go into checkpoints/ too): a local directory or any fsspec URI (s3://, gs://, file://)
    seed: int = 0  # seeds Python, numpy, torch and DGL: same seed and data = same run
    threads: int | None = None  # torch intra-op threads (null: torch's default)
    retain_freed_memory: bool | None = None  # glibc: from the first step on, freed large tensors stay in the heap for reuse (no page faults per tensor, but a peak that never falls). null: on in the distributed loop for batches of at most 65,536 positives, off otherwise and in the one-process loop (gnaq_dist/allocator.py)
    progress: bool = True  # show a progress bar with loss and ETA on stderr
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed: {self.seed} is not in 0 .. {MAX_SEED} (numpy's seed range)")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads: {self.threads} must be >= 1 or null (torch's default)")
        self.model.validate()
        self.optim.validate()
        self.schedule.validate()
        self.eval.validate()
        self.distributed.validate()
        self.checkpoint.validate()
        if self.model.method == "bigear" and self.schedule.propagation != "full":
            raise ConfigError("model.method=bigear needs schedule.propagation=full: its distillation scores "
                              "each user's teacher items, which sampled blocks do not hold")
        stop = self.schedule.early_stopping
        if stop.patience and int(stop.metric.partition("@")[2]) not in self.eval.ks:
            raise ConfigError(f"schedule.early_stopping.metric: {stop.metric} needs its cut-off in eval.ks "
                              f"({', '.join(map(str, self.eval.ks))})")
        if self.schedule.propagation == "sampled" and len(self.schedule.fanouts) != self.model.num_layers:
            raise ConfigError(
                f"schedule.fanouts has {len(self.schedule.fanouts)} entries but model.num_layers is "
                f"{self.model.num_layers}"
            )

    def check_distributed(self) -> None:
        """Refuse, before any worker starts, a method the distributed loop does not train."""
        if self.model.method in DISTRIBUTED_UNSUPPORTED:
            raise ConfigError(f"model.method={self.model.method} cannot train distributed (--workers): "
                              f"{DISTRIBUTED_UNSUPPORTED[self.model.method]}; train it in one process")
        if self.schedule.early_stopping.patience:
            raise ConfigError("schedule.early_stopping: the one-process trainer only (gnaq train without --workers)")

    def check_dataset(self, manifest: dict[str, Any]) -> None:
        """Refuse a dataset this config cannot train on, from its manifest alone (cheap:
        before any table is read or Ray starts): ``eval.split`` must be one the dataset
        has, and its train split must hold rows."""
        counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
        where = self.dataset or "the dataset"
        if not counts.get(self.eval.split):
            has = ", ".join(f"{k} {v:,}" for k, v in counts.items()) or "none"
            raise GnaqInputError(f"{where}: eval.split={self.eval.split!r} but the dataset has no "
                                 f"{self.eval.split} rows (splits: {has})")
        stop = self.schedule.early_stopping
        if stop.patience and not counts.get(stop.split):
            has = ", ".join(f"{k} {v:,}" for k, v in counts.items()) or "none"
            raise GnaqInputError(f"{where}: schedule.early_stopping.split={stop.split!r} but the dataset has no "
                                 f"{stop.split} rows (splits: {has}; ingest with --valid-fraction to make one)")
        if not counts.get("train"):
            raise GnaqInputError(f"{where}: the dataset has no training rows")

    @property
    def checkpoint_root(self) -> str:
        """Where checkpoints go: ``checkpoint.dir``, or ``<out>/checkpoints``."""
        return self.checkpoint.dir or f"{self.out.rstrip('/')}/checkpoints"

    @property
    def quantized(self) -> bool:
        return self.model.method != "fp"

    @property
    def warmup_epochs(self) -> int:
        return self.schedule.warmup_epochs if self.quantized else self.schedule.epochs
