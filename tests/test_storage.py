"""The one atomic writer (gnaq_dist.storage): a file or a directory appears whole or not at
all, locally and on other fsspec filesystems; and the training data's key lives with the
dataset."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.storage import AtomicOutput, atomic_path, resolve, write_file


def test_atomic_path_replaces_a_file_or_a_directory_and_a_failure_leaves_the_old_one(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as handle:
                handle.write("half")
            raise OSError("disk full")
    assert os.listdir(tmp_path) == ["out.csv"] and target.read_text() == "old"
    with atomic_path(target) as tmp:
        with open(tmp, "w") as handle:
            handle.write("new")
    assert os.listdir(tmp_path) == ["out.csv"] and target.read_text() == "new"
    (tmp_path / "d.parquet").mkdir()
    (tmp_path / "d.parquet" / "part").write_text("x")
    with atomic_path(tmp_path / "d.parquet") as tmp:
        with open(tmp, "w") as handle:
            handle.write("file")
    assert (tmp_path / "d.parquet").read_text() == "file" and sorted(os.listdir(tmp_path)) == ["d.parquet", "out.csv"]
    with pytest.raises(GnaqInputError, match="appeared while writing"):
        with atomic_path(target, overwrite=False) as tmp:
            with open(tmp, "w") as handle:
                handle.write("refused")
    assert target.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["d.parquet", "out.csv"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_write_file_entry(tmp_path, memfs, where):
    uri = str(tmp_path / "ck" / "a.bin") if where == "local" else "memory://ck/a.bin"
    fs, path = resolve(uri)
    entry = write_file(fs, path, b"payload")
    assert fs.cat(path) == b"payload" and entry["bytes"] == 7 and len(entry["sha256"]) == 64
    if where == "local":
        assert os.listdir(tmp_path / "ck") == ["a.bin"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_directory_output_with_another_commit_mark(tmp_path, memfs, where):
    uri = str(tmp_path / "b") if where == "local" else "memory://out/b"
    fs, path = resolve(uri)
    table = pa.table({"x": np.arange(3)})
    for version in (1, 2):
        with AtomicOutput(uri, mode="overwrite", mark="bundle.json") as out:
            entry = out.write_parquet("x.parquet", table)
            out.commit({"version": version, "files": {"x": entry}})
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        assert names == sorted([entry["path"], "bundle.json"])  # the old version's files are gone
        assert json.loads(fs.cat(f"{path}/bundle.json"))["version"] == version
    with pytest.raises(GnaqInputError, match="b: taken"):
        with AtomicOutput(uri, mark="bundle.json", exists_error="{uri}: taken"):
            pass
    with pytest.raises(RuntimeError):
        with AtomicOutput(uri, mode="overwrite", mark="bundle.json") as out:
            out.write_parquet("x.parquet", table)
            raise RuntimeError("crash before the commit")
    assert json.loads(fs.cat(f"{path}/bundle.json"))["version"] == 2
    assert len(fs.ls(path, detail=False)) == 2
    if where == "local":
        assert os.listdir(tmp_path) == ["b"]  # no staging debris


def test_create_refuses_an_output_that_appears_while_writing(tmp_path):
    with pytest.raises(GnaqInputError, match="appeared while writing"):
        with AtomicOutput(str(tmp_path / "d")) as out:
            out.write_bytes("a.txt", b"a")
            (tmp_path / "d").mkdir()
            (tmp_path / "d" / "other").write_text("someone else's")
            out.commit({"files": {}})
    assert os.listdir(tmp_path) == ["d"] and os.listdir(tmp_path / "d") == ["other"]


def test_data_key_lives_with_the_dataset():
    from gnaq_dist import checkpoint
    from gnaq_dist.dataset import data_key
    from gnaq_dist.synthetic import clustered_interactions

    assert checkpoint.data_key is data_key
    a = clustered_interactions(n_users=50, n_items=30, seed=1)
    b = clustered_interactions(n_users=50, n_items=30, seed=2)
    assert data_key(a) == data_key(a) and data_key(a)["train_sha256"] != data_key(b)["train_sha256"]


def test_a_signal_between_the_staging_folder_and_the_with_block_leaves_nothing(tmp_path, monkeypatch):
    """SIGINT (KeyboardInterrupt) right after the staging folder is made, before ``__enter__``
    returns (so no ``__exit__`` runs): the folder is removed all the same."""
    import gnaq_dist.staging as staging

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(staging, "hold", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with AtomicOutput(str(tmp_path / "bundle"), mark="bundle.json"):
            pass
    assert list(tmp_path.iterdir()) == []
