"""A partition computed apart from training (``gnaq partition``) and read by the ranks.

Why it matters: METIS reads the whole graph, so a rank that partitions at setup peaks at
the whole graph; ranks given ``distributed.partition_file`` only read the owners.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_utils import RankError, run_ranks
from gnaq_dist import checkpoint as ckpt
from gnaq_dist.cli import main as gnaq_main
from gnaq_dist.demo import ingest_bundled
from gnaq_dist.distributed.partition import Partition
from gnaq_dist.distributed.partition_store import read_partition, write_partition
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.synthetic import clustered_interactions

from test_distributed_loop import small_config


@pytest.fixture(scope="module")
def lastfm(tmp_path_factory) -> str:
    return ingest_bundled(tmp_path_factory.mktemp("ps") / "lastfm", progress=False)


def test_gnaq_partition_writes_a_metis_partition_the_ranks_can_read(lastfm, tmp_path, capsys):
    out = str(tmp_path / "part-w2")
    assert gnaq_main(["partition", lastfm, out, "--workers", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    manifest = json.loads((tmp_path / "part-w2" / "manifest.json").read_text())
    assert manifest["partition"]["method"] == "metis" and manifest["partition"]["world_size"] == 2
    assert printed["partition"]["owner_checksum"] == manifest["partition"]["owner_checksum"]
    # METIS keeps most edges inside a rank (a random split would cut about half of them).
    assert 0.0 < manifest["edge_cut"] < 0.35
    from gnaq_dist.dataset import load_dataset

    data = load_dataset(lastfm)
    part = read_partition(out, world_size=2, data=ckpt.data_key(data))
    assert part.checksum() == manifest["partition"]["owner_checksum"]
    assert part.num_nodes == data.n_users + data.n_items
    assert sorted(part.counts().tolist()) == sorted(manifest["partition"]["rows_per_rank"])
    # An existing partition is not replaced without --overwrite, and is left whole.
    assert gnaq_main(["partition", lastfm, out, "--workers", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert read_partition(out, world_size=2).checksum() == part.checksum()
    assert gnaq_main(["partition", lastfm, out, "--workers", "2", "--method", "hash", "--overwrite"]) == 0
    assert read_partition(out, world_size=2).method == "hash"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging debris


def test_a_partition_for_other_workers_other_data_or_altered_owners_is_refused(tmp_path):
    data = clustered_interactions(n_users=300, n_items=200, seed=1)
    key = ckpt.data_key(data)
    owner = np.arange(500) % 3
    uri = str(tmp_path / "p3")
    write_partition(Partition.from_owner(owner, 3, 300, 200), uri, {"data": key})
    assert read_partition(uri, world_size=3, data=key).counts().tolist() == [167, 167, 166]
    with pytest.raises(GnaqInputError, match=r"p3: made for 3 workers, this run has 2"):
        read_partition(uri, world_size=2, data=key)
    other = ckpt.data_key(clustered_interactions(n_users=300, n_items=200, seed=2))
    with pytest.raises(GnaqInputError, match=r"p3: computed from other data \((n_train|train_sha256) "):
        read_partition(uri, world_size=3, data=other)
    pq.write_table(pa.table({"owner": pa.array(np.roll(owner, 1), pa.int32())}), tmp_path / "p3" / "owner.parquet")
    with pytest.raises(GnaqInputError, match="owner.parquet does not match its manifest's checksum"):
        read_partition(uri, world_size=3, data=key)
    with pytest.raises(GnaqInputError, match="no manifest.json there"):
        read_partition(str(tmp_path / "nothing"), world_size=3)


def scenario_train_with_file(rank: int, world: int, uri: str) -> dict:
    from gnaq_dist.distributed.trainer import DistributedTrainer

    data = clustered_interactions(n_users=300, n_items=200, seed=1)
    config = small_config(**{"schedule.propagation": "full", "distributed.partition_file": uri,
                             "schedule.epochs": 1, "schedule.warmup_epochs": 0})
    trainer = DistributedTrainer(config, data)
    result = trainer.run()
    return {"partition": result["partition"], "owned": trainer.partition.owned_ids(rank).tolist(),
            "recall": result["metrics"]["recall@20"]}


@pytest.mark.slow
def test_ranks_train_on_the_partition_in_the_file(tmp_path):
    data = clustered_interactions(n_users=300, n_items=200, seed=1)
    owner = np.r_[np.arange(300) % 2, (np.arange(200) + 1) % 2]  # nothing METIS or hash would give
    part = Partition.from_owner(owner, 2, 300, 200, method="metis")
    uri = str(tmp_path / "p2")
    write_partition(part, uri, {"data": ckpt.data_key(data)})
    ranks = run_ranks(scenario_train_with_file, 2, uri, timeout=120)
    for rank, r in enumerate(ranks):
        assert r["partition"]["owner_checksum"] == part.checksum()
        assert r["owned"] == np.flatnonzero(owner == rank).tolist()
        assert np.isfinite(r["recall"])
    # A file made for 3 workers stops both ranks with the file's name in the error.
    uri3 = str(tmp_path / "p3")
    write_partition(Partition.from_owner(np.arange(500) % 3, 3, 300, 200), uri3, {"data": ckpt.data_key(data)})
    with pytest.raises(RankError, match="p3: made for 3 workers, this run has 2"):
        run_ranks(scenario_train_with_file, 2, uri3, timeout=120)
