"""The checkpoint a run would resume from, checked on the driver before any worker starts.

Why: the trainers choose and verify their resume checkpoint themselves, but under Ray
that happens in a worker, after Ray started: a corrupt checkpoint, another bit width,
another dataset or a manifest of the wrong shape then came back as a worker traceback
(exit 1). :func:`check_resume` runs the same refusals first, in the calling process,
so ``gnaq train`` answers them in one line with exit status 2 and nothing started.

What it reads: the checkpoint's manifest and every file it lists (sizes and sha256,
:func:`gnaq_dist.checkpoint.verify`), and the dataset's manifest. The dataset's train
pairs are read only when the checkpoint names another dataset fingerprint with the same
sizes (then only its data key, the trainers' own test, can tell).
"""

from __future__ import annotations

from typing import Any

from gnaq_dist import checkpoint as ckpt
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.train.config import TrainConfig


def _model_key(config: TrainConfig) -> dict[str, Any]:
    m = config.model
    return {"method": m.method, "bits": m.bits, "dim": m.dim, "num_layers": m.num_layers}


def _resume_candidate(config: TrainConfig) -> ckpt.Loaded | None:
    """The checkpoint ``checkpoint.resume`` names, verified (files and manifest shape), or None.

    ``never``, or ``auto`` without ``every_epochs``: None. ``auto``: the newest complete
    checkpoint under the run's checkpoint root (incomplete ones are skipped, as the trainers
    skip them). A URI: that checkpoint, which must verify.
    """
    ck = config.checkpoint
    if ck.resume == "never" or (ck.resume == "auto" and not ck.every_epochs):
        return None
    if ck.resume == "auto":
        return ckpt.CheckpointStore(config.checkpoint_root, config.storage_options).latest()
    return ckpt.Loaded(ck.resume, ckpt.verify(ck.resume, config.storage_options))


def check_resume(config: TrainConfig) -> ckpt.Loaded | None:
    """Refuse (``CheckpointError``, one line) a resume the trainer would refuse; returns the
    checkpoint it would start from (before a Ray restart hands it a newer one), or None."""
    loaded = _resume_candidate(config)
    if loaded is None:
        return None
    ckpt.check_model(loaded.uri, loaded.manifest, _model_key(config))
    try:
        ckpt.check_shard_columns(loaded.uri, loaded.manifest, config.storage_options)
    except ckpt.CheckpointError:
        raise
    except GnaqInputError as exc:  # a bit width or option the method refuses
        raise ckpt.CheckpointError(f"{loaded.uri}: {exc}") from None
    if not config.dataset:
        return loaded
    from gnaq_dist.dataset import load_dataset, read_manifest

    dataset = read_manifest(config.dataset, config.storage_options)
    theirs = loaded.manifest["data"]
    for key in ("n_users", "n_items"):
        if theirs.get(key) != dataset.get(key):
            raise ckpt.CheckpointError(f"{loaded.uri}: written for another dataset ({key} {theirs.get(key)!r}, "
                                       f"{config.dataset} has {dataset.get(key)!r})")
    if theirs.get("fingerprint") != dataset.get("fingerprint"):
        data = load_dataset(config.dataset, config.storage_options or None)
        ckpt.check_data(loaded.uri, loaded.manifest, ckpt.data_key(data))
    return loaded


__all__ = ["check_resume"]
