"""Reading datasets back: manifest checks and integrity verification."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_log
from gnaq_dist.config import from_dict
from gnaq_dist.dataset import load_dataset, load_id_maps, read_manifest
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.ingest import IngestConfig, ingest
from gnaq_dist.ingest.writer import dataset_fingerprint

LOG = {"user_id": ["a", "a", "b", "b", "c", "c"], "item_id": ["x", "y", "x", "z", "y", "z"], "timestamp": [1, 2, 3, 4, 5, 6]}


@pytest.fixture
def dataset(tmp_path):
    src = write_log(tmp_path / "log.parquet", LOG)
    ingest(src, str(tmp_path / "ds"), from_dict(IngestConfig, {"progress": False, "split": {"test_fraction": 0.5}}))
    return tmp_path / "ds"


def test_manifest_fields(dataset):
    m = read_manifest(str(dataset))
    assert m["format"] == "gnaq-dataset" and m["schema_version"] == 1 and m["version"] == 1
    assert (m["n_users"], m["n_items"], m["counts"]) == (3, 3, {"train": 3, "test": 3})
    assert m["density"] == pytest.approx(6 / 9)
    assert set(m["files"]) == {"train", "test", "user_map", "item_map"}
    assert m["fingerprint"] == dataset_fingerprint(m["files"])
    for key in ("uri", "fingerprint", "n_files", "rows_read", "rows_kept", "duplicates_dropped", "filtered_by_event", "dropped_by_kcore"):
        assert key in m["source"]
    assert m["ingest"]["split"]["test_fraction"] == 0.5


def test_load_dataset(dataset):
    d = load_dataset(str(dataset))
    assert (d.n_users, d.n_items, d.n_train) == (3, 3, 3) and d.train_user.dtype == np.int64
    assert d.fingerprint == read_manifest(str(dataset))["fingerprint"]
    users, items = load_id_maps(str(dataset))
    assert users.to_pylist() == ["a", "b", "c"] and items.to_pylist() == ["x", "y", "z"]


def test_refuses_directory_without_manifest(dataset):
    (dataset / "manifest.json").unlink()
    with pytest.raises(GnaqInputError, match="not a gnaq dataset"):
        load_dataset(str(dataset))


def test_detects_changed_file(dataset):
    path = dataset / "test.parquet"
    t = pq.read_table(path)
    pq.write_table(t.set_column(0, "user", pa.array(np.zeros(t.num_rows, np.int32))), path)
    with pytest.raises(GnaqInputError, match=r"test\.parquet: sha256"):
        load_dataset(str(dataset))
    load_dataset(str(dataset), verify=False)  # the check can be skipped on purpose


def test_detects_row_count_mismatch(dataset):
    path = dataset / "train.parquet"
    pq.write_table(pq.read_table(path).slice(0, 1), path)
    m = json.loads((dataset / "manifest.json").read_text())
    from gnaq_dist.storage import sha256_of
    import fsspec

    m["files"]["train"]["sha256"] = sha256_of(fsspec.filesystem("file"), str(path))
    (dataset / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(GnaqInputError, match=r"train\.parquet: 1 rows, the manifest says 3"):
        load_dataset(str(dataset))


def test_missing_file(dataset):
    (dataset / "item_map.parquet").unlink()
    with pytest.raises(GnaqInputError, match=r"item_map\.parquet: file listed in the manifest is missing"):
        load_id_maps(str(dataset))
