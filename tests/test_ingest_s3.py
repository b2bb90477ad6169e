"""s3:// ingest and append against a real moto S3 server on 127.0.0.1."""

from __future__ import annotations

import pytest

from conftest import write_log
from gnaq_dist.config import from_dict
from gnaq_dist.dataset import load_dataset, load_id_maps, read_manifest
from gnaq_dist.ingest import IngestConfig, ingest


@pytest.fixture(scope="module")
def s3_options(moto_endpoint):
    opts = {"key": "testing", "secret": "testing", "endpoint_url": moto_endpoint, "skip_instance_cache": True}
    import s3fs

    s3fs.S3FileSystem(**opts).mkdir("bucket")
    return opts


def test_s3_ingest_and_append(s3_options, tmp_path):
    log = {"user_id": ["a", "a", "b", "b", "c"], "item_id": ["x", "y", "x", "z", "z"], "timestamp": [1, 2, 3, 4, 5]}
    local = write_log(tmp_path / "l.parquet", log)
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    fs.put(local, "bucket/logs/dt=2026-11-01/part-0.parquet")
    config = from_dict(IngestConfig, {"progress": False, "storage_options": s3_options, "split": {"test_fraction": 0.5}})
    m = ingest("s3://bucket/logs", "s3://bucket/ds", config)
    assert m["counts"] == {"train": 3, "test": 2} and m["source"]["n_files"] == 1
    assert m["ingest"]["storage_options"]["secret"] == "***"  # no secrets in the manifest
    d = load_dataset("s3://bucket/ds", storage_options=s3_options)
    assert d.n_users == 3 and d.fingerprint == m["fingerprint"]

    fs.put(write_log(tmp_path / "n.parquet", {"user_id": ["d", "a"], "item_id": ["x", "w"], "timestamp": [9, 9]}),
           "bucket/new/part-0.parquet")
    m2 = ingest("s3://bucket/new", "s3://bucket/ds", config, append=True)
    users, items = load_id_maps("s3://bucket/ds", storage_options=s3_options)
    assert users.to_pylist() == ["a", "b", "c", "d"] and items.to_pylist() == ["x", "y", "z", "w"]
    assert read_manifest("s3://bucket/ds", s3_options)["version"] == m2["version"] == 2
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("bucket/ds")) == sorted(
        [e["path"] for e in m2["files"].values()] + ["manifest.json"])
