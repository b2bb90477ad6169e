"""``gnaq evaluate``: Recall@K / NDCG@K on an ingested dataset's held-out split.

What is scored: a sharded checkpoint, an exported bundle, train-set popularity, or the
generator's own ranking of a ``gnaq generate`` log (:mod:`gnaq_dist.oracle`). Train items
are masked, users are ranked against every item in batches (:mod:`gnaq_dist.evaluation`).

A model's final embeddings are computed as training's evaluation computes them (the
stored table dequantized and propagated over the train graph, in torch), and a
checkpoint's eval settings (ks, split, max_users, seed, batch size) are the defaults, so
a checkpoint scores exactly what its run logged for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from gnaq_dist.errors import GnaqInputError

#: Largest batch x items block of scores for popularity and the oracle (float64: 256 MiB).
SCORE_ELEMENTS = 1 << 25


@dataclass
class Scored:
    """What to rank with: embeddings (dot products) or a batch scoring function."""

    source: str  # checkpoint | bundle | popularity | oracle
    label: str  # what was scored, for the report
    user_emb: torch.Tensor | None = None
    item_emb: torch.Tensor | None = None
    score: Callable[[np.ndarray], torch.Tensor] | None = None
    defaults: dict[str, Any] | None = None  # eval settings the model brings (a checkpoint's run config)
    cap_batch: bool = False  # bound batch x items (scores that are no dot product)


def _eval_defaults() -> dict[str, Any]:
    """The settings a training run evaluates with by default (``eval.*`` and ``seed``)."""
    from gnaq_dist.train.config import EvalConfig, TrainConfig

    ev = EvalConfig()
    return {"ks": list(ev.ks), "split": ev.split, "max_users": ev.max_users, "seed": TrainConfig().seed,
            "batch_size": ev.batch_size}


def _detect_model(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """``"checkpoint"`` (``manifest.json`` of a gnaq checkpoint) or ``"bundle"`` (``bundle.json``)."""
    from gnaq_dist.checkpoint import MANIFEST
    from gnaq_dist.bundle import BUNDLE_JSON
    from gnaq_dist.storage import join, read_json, resolve

    fs, path = resolve(uri, storage_options)
    if not fs.exists(path):
        raise GnaqInputError(f"{uri}: no such checkpoint or bundle")
    if fs.exists(join(path, BUNDLE_JSON)):
        return "bundle"
    if fs.exists(join(path, MANIFEST)):
        try:
            fmt = read_json(fs, join(path, MANIFEST)).get("format")
        except (GnaqInputError, ValueError, AttributeError):
            fmt = None
        if fmt == "gnaq-dataset":
            raise GnaqInputError(f"{uri}: is a dataset, not a checkpoint or bundle (pass it as --dataset)")
        return "checkpoint"  # read_manifest names any other format
    raise GnaqInputError(f"{uri}: neither a checkpoint ({MANIFEST}) nor a bundle ({BUNDLE_JSON})")


@torch.no_grad()
def final_embeddings(kind: str, table: Any, graph, method, num_layers: int) -> torch.Tensor:
    """All nodes' final embeddings from a stored table, as training's evaluation computes them."""
    from gnaq_dist.propagation import final_from_packed, propagate_full

    if kind == "fp":
        return method.combine(propagate_full(graph, table, num_layers, method.layer_fn))
    return final_from_packed(graph, table, method.combine, num_layers)


def with_score_bias(final: torch.Tensor, bias: np.ndarray | None, n_users: int) -> torch.Tensor:
    """Final rows widened with the stored per-node score biases (``gnaq``), as training scores them."""
    from gnaq_dist.quant.base import score_rows

    if bias is None:
        return final
    b = torch.from_numpy(np.asarray(bias, dtype=np.float32))
    return score_rows(final, b, torch.arange(final.shape[0]) < n_users)


def _checkpoint_model(uri: str, data, graph, dataset: str, storage_options: dict[str, Any] | None = None) -> Scored:
    """A checkpoint of ``data`` (refused if its data key differs), its final embeddings."""
    from gnaq_dist import checkpoint as ckpt
    from gnaq_dist.dataset import data_key

    manifest = ckpt.read_manifest(uri, storage_options)
    mine, theirs = data_key(data), manifest.get("data") or {}
    for key in ("n_users", "n_items", "n_train", "train_sha256"):
        if theirs.get(key) != mine[key]:
            raise GnaqInputError(f"{uri}: trained on another dataset than {dataset} ({key} {theirs.get(key)!r} in "
                                 f"the checkpoint, {mine[key]!r} in the dataset)")
    manifest = ckpt.verify(uri, storage_options)  # every shard's size and sha256
    kind, table = ckpt.load_table(uri, manifest, data, storage_options)
    model = manifest["model"]
    method = ckpt.build_for_rows(manifest, 1)  # for combine / layer_fn only
    final = final_embeddings(kind, table, graph, method, int(model["num_layers"]))
    final = with_score_bias(final, getattr(table, "bias", None), data.n_users)
    config = manifest.get("config") or {}
    ev = config.get("eval") or {}
    defaults = {k: ev[k] for k in ("ks", "split", "max_users", "batch_size") if k in ev}
    if "seed" in config:
        defaults["seed"] = config["seed"]
    bits = "" if manifest["shard_method"] == "fp" else f" {model['bits']}-bit"
    label = f"checkpoint {uri} ({manifest['shard_method']}{bits}, step {manifest['step']}, epoch {manifest['epoch']})"
    return Scored("checkpoint", label, final[: data.n_users], final[data.n_users :], defaults=defaults)


def _same_ids(bundle_ids: pa.Array, dataset_ids: pa.Array) -> bool:
    def norm(a: pa.Array) -> pa.Array:
        if pa.types.is_integer(a.type):
            return a.cast(pa.int64())
        return a.cast(pa.large_string()) if pa.types.is_string(a.type) else a

    a, b = norm(bundle_ids), norm(dataset_ids)
    return len(a) == len(b) and a.type == b.type and a.equals(b)


def _bundle_model(path: str, data, graph, dataset: str, storage_options: dict[str, Any] | None = None) -> Scored:
    """A bundle exported from ``data`` (sizes, train graph and raw ids must match), its final
    embeddings recomputed in torch from the stored table (not the numpy ones ``Bundle.load``
    serves with, which may differ in the last bits)."""
    from gnaq_dist import serving
    from gnaq_dist.dataset import load_id_maps
    from gnaq_dist.interactions import unique_pair_keys
    from gnaq_dist.quant import build_method

    # serving's own readers: bundle.json and every file verified as Bundle.load verifies them
    info = serving._read_info(path)
    tables = serving._read_tables(path, info, True)
    kind, files = info["kind"], info["files"]
    n_users, n_items = serving._int_field(info, "n_users", 1), serving._int_field(info, "n_items", 1)
    if (n_users, n_items) != (data.n_users, data.n_items):
        raise GnaqInputError(f"{path}: a bundle of {n_users} users x {n_items} items, {dataset} has "
                             f"{data.n_users} x {data.n_items}: exported from another dataset")
    train = tables["train"]
    keys = (train.column("user").to_numpy().astype(np.int64) * n_items
            + train.column("item").to_numpy().astype(np.int64))
    if not np.array_equal(keys, unique_pair_keys(data.train_user, data.train_item, n_items)):
        raise GnaqInputError(f"{path}: its train graph is not {dataset}'s: exported from another dataset "
                             f"(or another version of it)")
    if info.get("raw_ids") == "dataset":
        users_raw, items_raw = load_id_maps(dataset, storage_options)
        for what, mine, theirs in (("user", tables["users"], users_raw), ("item", tables["items"], items_raw)):
            if not _same_ids(mine.column("raw_id").combine_chunks(), theirs):
                raise GnaqInputError(f"{path}: its {what} raw ids are not {dataset}'s: exported from another dataset")
    num_layers, dim = serving._int_field(info, "num_layers"), serving._int_field(info, "dim", 1)
    x0 = torch.from_numpy(serving._layer0(path, info, files, tables, n_users + n_items, dim))
    if kind == "fp" or info.get("needs_propagation", True):
        bits = None if kind == "fp" else info.get("bits")
        with torch.random.fork_rng():
            method = build_method(str(info.get("method")), 1, dim, bits, num_layers)
        final = final_embeddings("fp", x0, graph, method, num_layers)  # = final_from_packed's propagation
    else:  # already-propagated layers (BiGeaR): weight each group, as final_from_packed does
        groups = serving._int_field(info, "groups", 1)
        weights = torch.tensor(info.get("group_weights") or [1.0] * groups, dtype=x0.dtype)
        final = (x0.reshape(x0.shape[0], groups, -1) * weights.view(1, -1, 1)).reshape(x0.shape[0], -1)
    final = with_score_bias(final, serving._bias(path, files, tables, n_users + n_items), n_users)
    bits = "" if kind == "fp" else f" {info.get('bits')}-bit"
    step = (info.get("meta") or {}).get("step")
    label = f"bundle {path} ({info.get('method')}{bits}" + (f", step {step})" if step is not None else ")")
    return Scored("bundle", label, final[:n_users], final[n_users:])


def _popularity_model(data) -> Scored:
    """Items ranked by the number of train users who have them; ties by item index."""
    from gnaq_dist.interactions import unique_pair_keys

    keys = unique_pair_keys(data.train_user, data.train_item, data.n_items)
    count = np.bincount(keys % data.n_items, minlength=data.n_items).astype(np.float64)
    # Counts differ by >= 1: the fraction only orders equal counts (lower index first).
    score = count + 0.5 * (1.0 - np.arange(data.n_items, dtype=np.float64) / data.n_items)
    return Scored("popularity", "popularity (train interactions per item)",
                  torch.ones(data.n_users, 1, dtype=torch.float64), torch.from_numpy(score)[:, None], cap_batch=True)


def _oracle_model(log: str, data, dataset: str, storage_options: dict[str, Any] | None = None, *,
                 posterior: bool = False) -> Scored:
    """The generator's p(item | user's hidden cluster) of the log ``data`` was ingested from;
    with ``posterior``, p(item | user's train items): the cluster inferred, not known."""
    from gnaq_dist.dataset import load_id_maps
    from gnaq_dist.graph import interactions_csr
    from gnaq_dist.oracle import oracle_for

    users_raw, items_raw = load_id_maps(dataset, storage_options)
    oracle = oracle_for(log, dataset, data, users_raw, items_raw)
    if posterior:
        train = interactions_csr(data.train_user, data.train_item, data.n_users, data.n_items)
        return Scored("oracle", f"oracle {os.fspath(log)} (the generator's p(item | user's train items))",
                      score=lambda users: oracle.posterior_scores(users, train), cap_batch=True)
    return Scored("oracle", f"oracle {os.fspath(log)} (the generator's p(item | user's cluster))",
                  score=oracle.scores, cap_batch=True)


def parse_ks(text: str) -> list[int]:
    """``"10,20,50"`` -> ``[10, 20, 50]``."""
    try:
        ks = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise GnaqInputError(f"--ks: {text!r} is not a comma-separated list of integers") from None
    if not ks or min(ks) < 1:
        raise GnaqInputError(f"--ks: {text!r}: cut-offs must be positive integers")
    return ks


def _settings(scored: Scored, given: dict[str, Any]) -> dict[str, Any]:
    out = {**_eval_defaults(), **(scored.defaults or {}), **{k: v for k, v in given.items() if v is not None}}
    ks = out["ks"]
    if isinstance(ks, str):
        ks = parse_ks(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise GnaqInputError(f"ks: cut-offs must be positive integers, got {ks!r}")
    out["ks"] = [int(k) for k in ks]
    if out["split"] not in ("test", "valid"):
        raise GnaqInputError(f"--split: must be test or valid, got {out['split']!r}")
    for name, low in (("max_users", 1), ("seed", 0), ("batch_size", 1)):
        value = out[name]
        if value is None and name == "max_users":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise GnaqInputError(f"--{name.replace('_', '-')}: must be an integer >= {low}, got {value!r}")
    return out


def evaluate(
    model: str | None = None,
    dataset: str | None = None,
    *,
    popularity: bool = False,
    oracle: str | None = None,
    posterior: bool = False,
    ks: Sequence[int] | str | None = None,
    split: str | None = None,
    max_users: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of one of ``model`` (checkpoint or bundle URI), ``popularity``, ``oracle`` (log
    directory; ``posterior``: the user's cluster inferred from its train items) on ``dataset``: ``{"model", "source", "dataset", "split", "users", "max_users",
    "seed", "ks", "recall@K", "ndcg@K", ...}``. Unset settings come from a checkpoint's
    run config, else from the training defaults."""
    from gnaq_dist.dataset import load_dataset
    from gnaq_dist.evaluation import evaluate_ranking, evaluate_scores, finalize, users_to_evaluate
    from gnaq_dist.graph import build_graph, interactions_csr

    chosen = [name for name, on in (("CHECKPOINT_OR_BUNDLE", model is not None), ("--popularity", popularity),
                                    ("--oracle", oracle is not None)) if on]
    if len(chosen) != 1:
        raise GnaqInputError("give exactly one of CHECKPOINT_OR_BUNDLE, --popularity, --oracle LOG"
                             + (f" (got {' and '.join(chosen)})" if chosen else ""))
    if posterior and oracle is None:
        raise GnaqInputError("--posterior goes with --oracle LOG")
    if not dataset:
        raise GnaqInputError("--dataset: the ingested dataset to evaluate on is required")
    data = load_dataset(dataset, storage_options)
    graph = None
    if model is not None:
        source = _detect_model(model, storage_options)
        graph = build_graph(data)
        if source == "checkpoint":
            scored = _checkpoint_model(model, data, graph, dataset, storage_options)
        else:
            from gnaq_dist.storage import is_local, resolve

            fs, path = resolve(model, storage_options)
            if not is_local(fs):
                raise GnaqInputError(f"{model}: bundles are read from local paths")
            scored = _bundle_model(path if "://" in str(model) else os.fspath(model), data, graph, dataset,
                                  storage_options)
    elif popularity:
        scored = _popularity_model(data)
    else:
        scored = _oracle_model(oracle, data, dataset, storage_options, posterior=posterior)

    settings = _settings(scored, {"ks": ks, "split": split, "max_users": max_users, "seed": seed,
                                  "batch_size": batch_size})
    try:
        held_user, held_item = data.split(settings["split"])
    except ValueError:
        raise GnaqInputError(f"{dataset}: has no {settings['split']} split") from None
    train_csr = graph.train_csr() if graph is not None else interactions_csr(
        data.train_user, data.train_item, data.n_users, data.n_items)
    test_csr = interactions_csr(held_user, held_item, data.n_users, data.n_items)
    users = users_to_evaluate(test_csr[0], settings["max_users"], settings["seed"])
    batch = settings["batch_size"]
    if scored.cap_batch:
        batch = max(1, min(batch, SCORE_ELEMENTS // max(data.n_items, 1)))
    if scored.score is not None:
        sums = evaluate_scores(scored.score, data.n_items, users, train_csr, test_csr, settings["ks"], batch, progress)
    else:
        sums = evaluate_ranking(scored.user_emb, scored.item_emb, users, train_csr, test_csr, settings["ks"], batch,
                                progress)
    return {"model": scored.label, "source": scored.source, "dataset": dataset, "split": settings["split"],
            "users": sums.n_users, "max_users": settings["max_users"], "seed": settings["seed"],
            "ks": settings["ks"], **finalize(sums)}


def format_report(result: dict[str, Any]) -> str:
    """A short human table of :func:`evaluate`'s result."""
    sample = "all with held-out items" if result["max_users"] is None else \
        f"a sample of at most {result['max_users']}, seed {result['seed']}"
    lines = [f"model: {result['model']}",
             f"dataset: {result['dataset']}  split: {result['split']}  users: {result['users']} ({sample})",
             "K\trecall\tndcg"]
    lines += [f"{k}\t{result[f'recall@{k}']:.4f}\t{result[f'ndcg@{k}']:.4f}" for k in result["ks"]]
    return "\n".join(lines)


__all__ = ["Scored", "evaluate", "final_embeddings", "format_report", "parse_ks"]
