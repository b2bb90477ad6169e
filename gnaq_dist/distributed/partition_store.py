"""A node partition computed once, apart from the training workers, and kept in a file.

Why: METIS reads the whole graph, so a rank that runs it at setup peaks at the whole
graph's memory whatever its shard. ``gnaq partition`` runs it in its own process (or on a bigger machine, once
per dataset and worker count) and writes the owner of every node; workers given
``distributed.partition_file`` read that instead, and their memory follows their shard.
The same split as DGL's ``partition_graph`` before ``DistGraph`` training and
PyTorch-BigGraph's partitioned edge files.

Layout of ``<uri>``, committed atomically (:class:`~gnaq_dist.storage.AtomicOutput`)::

    owner.parquet    one int32 column ``owner``: the rank of global node 0, 1, ... (users, then items)
    manifest.json    kind, the partition (``Partition.describe()``), the dataset's key, edge cut, seconds
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from gnaq_dist.distributed.partition import PARTITION_METHODS, Partition, partition_nodes, rank_loads
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.storage import MANIFEST, AtomicOutput, join, read_json, resolve

log = logging.getLogger(__name__)

KIND = "gnaq-partition"
OWNER_FILE = "owner.parquet"


def compute_partition(dataset: str, world_size: int, method: str = "metis", seed: int = 0,
                      storage_options: dict[str, Any] | None = None) -> tuple[Partition, dict[str, Any]]:
    """Partition ``dataset``'s nodes over ``world_size`` ranks as a training run's rank 0 would.

    Returns the partition and what its manifest records (the dataset's key, the edge cut,
    the seconds taken).
    """
    from gnaq_dist.dataset import data_key, load_dataset
    from gnaq_dist.graph import TrainCSR, build_graph_from_arrays

    if method not in PARTITION_METHODS:
        raise GnaqInputError(f"--method {method!r}: expected one of {', '.join(PARTITION_METHODS)}")
    if world_size < 1:
        raise GnaqInputError(f"--workers {world_size}: need at least 1")
    t0 = time.perf_counter()
    data = load_dataset(dataset, storage_options=storage_options)
    key = data_key(data)
    edges = TrainCSR.from_pairs(data.n_users, data.n_items, data.train_user, data.train_item)
    del data
    users = np.repeat(np.arange(edges.n_users, dtype=np.int64), np.diff(edges.indptr))
    # METIS reads the whole symmetric graph; hash only the counts
    graph = build_graph_from_arrays(edges.n_users, edges.n_items, users, edges.indices) \
        if method == "metis" and world_size > 1 else edges
    part = partition_nodes(graph, world_size, method, seed=seed)
    del graph
    load = rank_loads(part.owner, users, edges.indices, edges.n_users, world_size)
    cut = load.cut_edges / edges.indices.shape[0] if edges.indices.size else 0.0
    return part, {"data": key, "edge_cut": cut, "seconds": round(time.perf_counter() - t0, 3),
                  "requested_method": method, "seed": int(seed)}


def write_partition(partition: Partition, uri: str, info: dict[str, Any],
                    storage_options: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write ``partition`` (and ``info`` from :func:`compute_partition`) to ``uri``, all or nothing."""
    with AtomicOutput(uri, storage_options, mode="overwrite" if overwrite else "create") as out:
        entry = out.write_parquet(OWNER_FILE, pa.table({"owner": pa.array(partition.owner, pa.int32())}))
        manifest = {"kind": KIND, "partition": partition.describe(), **info, "files": {"owner": entry}}
        out.commit(manifest)
    return manifest


def read_partition(uri: str, storage_options: dict[str, Any] | None = None, *, world_size: int,
                   data: dict[str, Any] | None = None) -> Partition:
    """The partition at ``uri``, checked against the run: its worker count and (``data``,
    a :func:`~gnaq_dist.dataset.data_key`) the dataset it was computed from."""
    import pyarrow.parquet as pq

    fs, path = resolve(uri, storage_options)
    manifest_path = join(path, MANIFEST)
    if not fs.exists(manifest_path):
        raise GnaqInputError(f"distributed.partition_file {uri}: no {MANIFEST} there (write one with gnaq partition)")
    manifest = read_json(fs, manifest_path)
    if manifest.get("kind") != KIND:
        raise GnaqInputError(f"distributed.partition_file {uri}: {MANIFEST} is not a partition's "
                             f"(kind {manifest.get('kind')!r})")
    desc = manifest["partition"]
    if int(desc["world_size"]) != world_size:
        raise GnaqInputError(f"distributed.partition_file {uri}: made for {desc['world_size']} workers, "
                             f"this run has {world_size}")
    if data is not None:
        theirs = manifest.get("data", {})
        for field in ("n_users", "n_items", "n_train", "train_sha256"):
            if theirs.get(field) != data.get(field):
                raise GnaqInputError(f"distributed.partition_file {uri}: computed from other data "
                                     f"({field} {theirs.get(field)!r}, this dataset's {data.get(field)!r})")
    with fs.open(join(path, manifest["files"]["owner"]["path"]), "rb") as handle:
        owner = pq.read_table(handle, columns=["owner"])["owner"].to_numpy()
    part = Partition.from_owner(owner, world_size, int(desc["n_users"]), int(desc["n_items"]),
                                method=desc["method"])
    if part.checksum() != desc["owner_checksum"]:
        raise GnaqInputError(f"distributed.partition_file {uri}: {OWNER_FILE} does not match its manifest's checksum")
    return part


__all__ = ["compute_partition", "read_partition", "write_partition"]
