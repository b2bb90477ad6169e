"""The generator's own ranking of a dataset ingested from a ``gnaq generate`` log.

Why: on synthetic data the best achievable Recall/NDCG is known. A row of the log picks
its item from p(item | user's hidden cluster) (:mod:`gnaq_dist.synthetic_logs`); ranking
each user's unseen items by that probability is the Bayes-optimal ranking, the ceiling a
trained model is measured against.

For a user of cluster ``c`` and an item of popularity rank ``r`` in cluster ``c'``, with
Zipf-Mandelbrot weights ``w_r = (r + 1 + item_offset)^-item_exponent``, ``W`` their sum
and ``W_k`` the sum over cluster ``k``::

    p = w_r * ( p_own [c' = c] / W_c
              + p_near / 2 * ([c' = c-1 mod C] + [c' = c+1 mod C]) / W_c'
              + (1 - p_own - p_near) / W )

Scores are computed a batch of users at a time from a ``C x C`` table and per-item
weights, so memory is ``O(batch x items + C^2)``, never users x items.

The dataset's raw ids (``u<k>``, ``i<k>``) map to the generator's indices; a log is
refused when an id does not parse or lies outside its spec, and when its hidden clusters
explain the dataset's train pairs no better than shuffled clusters (another seed).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.synthetic_logs import META_FILE, SCHEMA_VERSION, LatentModel, LogSpec

#: Refuse a log whose clusters explain the train pairs less than this many standard
#: deviations better than shuffled clusters (see :meth:`Oracle.source_z`).
MIN_SOURCE_Z = 4.0
PERMUTATIONS = 32
MAX_CHECK_PAIRS = 1 << 20  # a fixed sample of the train pairs on larger datasets


def read_spec(log: str | os.PathLike) -> LogSpec:
    """The :class:`LogSpec` of a generated log directory, from its ``_generate.json``."""
    path = os.fspath(log)
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(path):
        raise GnaqInputError(f"{path}: no such log directory")
    if not os.path.isdir(path):
        raise GnaqInputError(f"{path}: not a directory; --oracle needs a log directory written by gnaq generate "
                             f"(a single .parquet output carries no {META_FILE})")
    try:
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except FileNotFoundError:
        raise GnaqInputError(f"{meta_path}: missing: {path} is not a log written by gnaq generate") from None
    except (ValueError, UnicodeDecodeError):
        raise GnaqInputError(f"{meta_path}: not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION or not isinstance(
            meta.get("spec"), dict):
        raise GnaqInputError(f"{meta_path}: not a gnaq generate v{SCHEMA_VERSION} metadata file")
    known = {f.name for f in fields(LogSpec)}
    unknown = sorted(set(meta["spec"]) - known)
    if unknown:
        raise GnaqInputError(f"{meta_path}: unknown spec key(s) {', '.join(unknown)}")
    try:
        spec = LogSpec(**meta["spec"])
        spec.validate()
    except (TypeError, GnaqInputError) as exc:
        raise GnaqInputError(f"{meta_path}: bad spec ({exc})") from None
    return spec


def parse_raw_ids(raw: pa.Array | pa.ChunkedArray, prefix: str, limit: int, what: str, where: str) -> np.ndarray:
    """Generator indices ``k`` of raw ids ``<prefix><k>``; every id must parse and lie in ``[0, limit)``."""
    if isinstance(raw, pa.ChunkedArray):
        raw = raw.combine_chunks()
    if not (pa.types.is_string(raw.type) or pa.types.is_large_string(raw.type)):
        raise GnaqInputError(f"{where}: {what} ids are {raw.type}, a gnaq generate log has '{prefix}<k>' strings")
    ok = pc.fill_null(pc.match_substring_regex(raw, f"^{prefix}(0|[1-9][0-9]{{0,17}})$"), False)
    bad = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
    if bad.size:
        raise GnaqInputError(f"{where}: {what} id {raw[int(bad[0])].as_py()!r} is not '{prefix}<k>' "
                             f"({bad.size} such): not a dataset of a gnaq generate log")
    k = pc.cast(pc.utf8_slice_codeunits(raw, 1), pa.int64()).to_numpy(zero_copy_only=False)
    out = np.flatnonzero(k >= limit)
    if out.size:
        raise GnaqInputError(f"{where}: {what} id {prefix}{int(k[out[0]])} is outside the log's {limit} {what}s "
                             f"({prefix}0..{prefix}{limit - 1}; {out.size} such)")
    return k


@dataclass
class Oracle:
    """p(item | user's cluster) of a spec for the users and items of one dataset."""

    spec: LogSpec
    user_cluster: np.ndarray  # int64 (n_users,): hidden cluster of dataset user j
    item_cluster: np.ndarray  # int64 (n_items,)
    item_weight: np.ndarray  # float64 (n_items,): the item's Zipf-Mandelbrot weight
    table: np.ndarray  # float64 (C, C): p(item | user cluster c) / w_item for an item of cluster c'

    @classmethod
    def build(cls, spec: LogSpec, user_ids: pa.Array, item_ids: pa.Array, where: str) -> Oracle:
        """For a dataset whose raw ids (its id maps, index order) are ``user_ids`` / ``item_ids``."""
        users = parse_raw_ids(user_ids, "u", spec.users, "user", where)
        items = parse_raw_ids(item_ids, "i", spec.items, "item", where)
        model = LatentModel(spec)
        C = model.n_clusters
        w = (np.arange(spec.items, dtype=np.float64) + 1.0 + spec.item_offset) ** -spec.item_exponent
        rank_of_label = np.empty(spec.items, dtype=np.int64)
        rank_of_label[model.item_label] = np.arange(spec.items, dtype=np.int64)
        ranks = rank_of_label[items]
        w_cluster = np.bincount(model.rank_cluster, weights=w, minlength=C)  # every cluster has >= 1 item
        table = np.full((C, C), max(0.0, 1.0 - spec.p_own - spec.p_near) / w.sum())
        own = np.arange(C)
        table[own, own] += spec.p_own / w_cluster
        for side in (-1, 1):  # separate statements: C <= 2 adds to the same cell twice
            near = (own + side) % C
            table[own, near] += 0.5 * spec.p_near / w_cluster[near]
        return cls(spec, model.user_cluster[users].astype(np.int64), model.rank_cluster[ranks].astype(np.int64),
                   w[ranks], table)

    def scores(self, users: np.ndarray) -> torch.Tensor:
        """(len(users), n_items) float64 p(item | user), a fresh tensor."""
        rows = torch.from_numpy(self.table[self.user_cluster[np.asarray(users, dtype=np.int64)]])
        out = torch.index_select(rows, 1, torch.from_numpy(self.item_cluster))
        return out.mul_(torch.from_numpy(self.item_weight))

    def posterior_scores(self, users: np.ndarray, train_csr: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        """(len(users), n_items) float64 p(item | the user's train items): the cluster is not
        known but inferred, ``p(c | train) ∝ prod_i p(i | c)`` (clusters are dealt uniformly),
        and items are ranked by ``sum_c p(c | train) p(item | c)``. The ceiling of a model that
        learns from this split: what the user's own items can tell, with the generator's
        parameters known."""
        indptr, indices = train_csr
        users = np.asarray(users, dtype=np.int64)
        log_table = np.log(np.maximum(self.table, 1e-300))
        C = self.table.shape[0]
        log_post = np.zeros((users.shape[0], C))
        for j, u in enumerate(users):  # item weights cancel between clusters: only their clusters count
            ic = self.item_cluster[indices[indptr[u]:indptr[u + 1]]]
            log_post[j] = log_table[:, ic].sum(1) if ic.size else 0.0
        log_post -= log_post.max(1, keepdims=True)
        post = np.exp(log_post)
        post /= post.sum(1, keepdims=True)
        by_cluster = torch.from_numpy(post @ self.table)  # (users, C): p(item | train) / w_item per item cluster
        out = torch.index_select(by_cluster, 1, torch.from_numpy(self.item_cluster))
        return out.mul_(torch.from_numpy(self.item_weight))

    def source_z(self, users: np.ndarray, items: np.ndarray) -> dict[str, float]:
        """How much better the hidden clusters explain (user, item) pairs than shuffled ones.

        ``S = sum log p(item | user's cluster)`` over the pairs (at most ``MAX_CHECK_PAIRS``,
        a fixed sample), against the same sum with the users' clusters permuted
        ``PERMUTATIONS`` times (fixed seed): ``z = (S - mean) / std``. Item weights cancel,
        so only the cluster structure counts. ``z`` is NaN when shuffling changes nothing
        (one cluster, or no cluster preference in the spec)."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        rng = np.random.default_rng(0)
        if users.shape[0] > MAX_CHECK_PAIRS:
            pick = rng.choice(users.shape[0], MAX_CHECK_PAIRS, replace=False)
            users, items = users[pick], items[pick]
        log_f = np.log(np.maximum(self.table, 1e-300))  # a pair the spec cannot produce weighs heavily
        ic = self.item_cluster[items]
        observed = float(log_f[self.user_cluster[users], ic].sum())
        shuffled = np.array([log_f[rng.permutation(self.user_cluster)[users], ic].sum()
                             for _ in range(PERMUTATIONS)])
        spread = float(shuffled.std())
        z = (observed - float(shuffled.mean())) / spread if spread > 1e-9 * max(abs(observed), 1.0) else float("nan")
        return {"z": z, "pairs": int(users.shape[0]), "permutations": PERMUTATIONS}

    def check_source(self, users: np.ndarray, items: np.ndarray, log: str, dataset: str) -> dict[str, float]:
        """Refuse ``log`` when its hidden clusters do not explain the dataset's train pairs.

        Catches a log of another seed or cluster count with the same id ranges: its clusters
        are unrelated to the data, and ``z`` (:meth:`source_z`) stays near 0; the true source
        scored 4.8 at 48 train pairs, 840 at 253k (docs/evaluate.md). Ids that do not parse
        or lie outside the spec's ranges are caught before, by :meth:`build`. Skipped when
        ``z`` is NaN.
        """
        check = self.source_z(users, items)
        if check["pairs"] and check["z"] < MIN_SOURCE_Z:
            raise GnaqInputError(
                f"{log}: not the source of {dataset}: its hidden clusters explain the dataset's train pairs no "
                f"better than shuffled ones (z = {check['z']:.1f} over {PERMUTATIONS} shuffles, need "
                f">= {MIN_SOURCE_Z:g}); a log of another seed or spec?")
        return check


def oracle_for(log: str | os.PathLike, dataset: str, data: Any, user_ids: pa.Array, item_ids: pa.Array) -> Oracle:
    """The checked oracle of ``log`` for ``data`` (an ingested dataset of it)."""
    spec = read_spec(log)
    where = f"{dataset} (with --oracle {os.fspath(log)})"
    if data.n_users > spec.users or data.n_items > spec.items:
        raise GnaqInputError(f"{where}: {data.n_users} users x {data.n_items} items, more than the log's "
                             f"{spec.users} x {spec.items}: not its source")
    oracle = Oracle.build(spec, user_ids, item_ids, where)
    oracle.check_source(data.train_user, data.train_item, os.fspath(log), dataset)
    return oracle


__all__ = ["MAX_CHECK_PAIRS", "MIN_SOURCE_Z", "PERMUTATIONS", "Oracle", "oracle_for", "parse_raw_ids", "read_spec"]
