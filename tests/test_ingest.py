"""Ingest end to end on real Parquet files (tmp_path and memory://)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_log
from gnaq_dist.config import from_dict
from gnaq_dist.dataset import load_dataset, load_id_maps, read_manifest
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.ingest import IngestConfig, ingest
from gnaq_dist.ingest.cli import add_ingest_arguments, run_ingest_from_args
from gnaq_dist.storage import AtomicOutput


def cfg(**kw) -> IngestConfig:
    kw.setdefault("progress", False)
    return from_dict(IngestConfig, kw)


def raw_pairs(out: str, split: str = "train") -> set[tuple]:
    data = load_dataset(out)
    users, items = load_id_maps(out)
    u, i = data.split(split)
    return set(zip(users.take(pa.array(u)).to_pylist(), items.take(pa.array(i)).to_pylist()))


def small_log(n_users: int = 30, n_items: int = 20, per_user: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    users, items, ts = [], [], []
    for u in range(n_users):
        for j, it in enumerate(rng.choice(n_items, per_user, replace=False)):
            users.append(f"u{u}")
            items.append(f"i{it}")
            ts.append(1_700_000_000 + 1000 * u + j)
    return {"user_id": users, "item_id": items, "timestamp": ts}


def test_id_maps_round_trip_to_raw_ids(tmp_path):
    log = small_log()
    src = write_log(tmp_path / "log.parquet", log)
    m = ingest(src, str(tmp_path / "out"), cfg())
    pairs = set()
    for split in ("train", "test"):
        pairs |= raw_pairs(str(tmp_path / "out"), split)
    assert pairs == set(zip(log["user_id"], log["item_id"]))
    users, items = load_id_maps(str(tmp_path / "out"))
    # numbered in order of first appearance
    assert users.to_pylist() == list(dict.fromkeys(log["user_id"]))
    assert items.to_pylist() == list(dict.fromkeys(log["item_id"]))
    t = pq.read_table(tmp_path / "out" / "user_map.parquet")
    assert t.schema.field("index").type == pa.int32() and t.schema.field("raw_id").type == pa.string()
    assert m["n_users"] == 30 and m["counts"]["train"] + m["counts"]["test"] == 180
    tr = pq.read_table(tmp_path / "out" / "train.parquet")
    assert tr.schema.field("user").type == pa.int32() and tr.schema.field("timestamp").type == pa.int64()


@pytest.mark.parametrize("typ", [pa.int8(), pa.uint32(), pa.int64()])
def test_integer_and_dictionary_ids(tmp_path, typ):
    users = pa.array([3, 1, 3, 2, 1, 2], type=typ)
    items = pa.array(["a", "b", "b", "a", "a", "c"]).dictionary_encode()
    src = write_log(tmp_path / "log.parquet", pa.table({"user_id": users, "item_id": items}))
    ingest(src, str(tmp_path / "out"), cfg(columns={"timestamp": None}, split={"test_fraction": 0.5}))
    u, i = load_id_maps(str(tmp_path / "out"))
    assert u.type == pa.int64() and u.to_pylist() == [3, 1, 2]
    assert i.type == pa.string() and i.to_pylist() == ["a", "b", "c"]
    m = read_manifest(str(tmp_path / "out"))
    assert m["has_timestamp"] is False and m["counts"] == {"train": 3, "test": 3}


def test_dedup_keeps_latest_timestamp(tmp_path):
    src = write_log(tmp_path / "log.parquet", {
        "user_id": ["a", "a", "a", "b", "b", "a"],
        "item_id": ["x", "x", "x", "x", "y", "y"],
        "timestamp": [5, 9, 7, 1, 2, 3],
    })
    m = ingest(src, str(tmp_path / "out"), cfg(split={"strategy": "temporal_global", "cutoff": 9, "valid_cutoff": 3}))
    assert m["source"]["duplicates_dropped"] == 2
    d = load_dataset(str(tmp_path / "out"))
    # (a, x) kept with t=9 -> at the cutoff -> test; (a, y, 3) -> valid window [3, 9)
    assert d.test_user.tolist() == [0] and d.test_item.tolist() == [0]
    assert d.meta["test_timestamp"].tolist() == [9]
    assert d.meta["valid_timestamp"].tolist() == [3] and d.n_train == 2


def test_timestamp_types_are_unix_seconds(tmp_path):
    ts_ms = pa.array([1_700_000_000_123, 1_700_000_100_999], type=pa.timestamp("ms", tz="UTC"))
    write_log(tmp_path / "src" / "a.parquet", {"user_id": ["a", "a"], "item_id": ["x", "y"], "timestamp": ts_ms})
    days = pa.array([19_700, 19_701], type=pa.date32())
    write_log(tmp_path / "src" / "b.parquet", {"user_id": ["b", "b"], "item_id": ["x", "y"], "timestamp": days})
    ingest(str(tmp_path / "src"), str(tmp_path / "out"), cfg(split={"strategy": "temporal_user", "test_last_n": 1}))
    d = load_dataset(str(tmp_path / "out"))
    assert sorted(d.meta["test_timestamp"].tolist()) == [1_700_000_100, 19_701 * 86_400]
    assert sorted(d.meta["train_timestamp"].tolist()) == [1_700_000_000, 19_700 * 86_400]


def test_kcore_every_remaining_node_has_degree_k(tmp_path):
    rng = np.random.default_rng(3)
    n = 3000
    users = (rng.zipf(1.6, n) % 400).astype(np.int64)
    items = (rng.zipf(1.6, n) % 300).astype(np.int64)
    src = write_log(tmp_path / "log.parquet", {"user_id": users, "item_id": items})
    m = ingest(src, str(tmp_path / "out"), cfg(columns={"timestamp": None}, kcore_users=3, kcore_items=4))
    d = load_dataset(str(tmp_path / "out"))
    u = np.concatenate([d.train_user, d.test_user])
    i = np.concatenate([d.train_item, d.test_item])
    assert np.bincount(u, minlength=d.n_users).min() >= 3
    assert np.bincount(i, minlength=d.n_items).min() >= 4
    assert m["source"]["dropped_by_kcore"] > 0
    assert m["source"]["rows_kept"] == len(u) == n - m["source"]["duplicates_dropped"] - m["source"]["dropped_by_kcore"]


def sized_log(sizes: list[int]) -> dict:
    users, items, ts = [], [], []
    for u, n in enumerate(sizes):
        for j in range(n):
            users.append(f"u{u}")
            items.append(f"i{j}")
            ts.append(1000 * j + u)
    return {"user_id": users, "item_id": items, "timestamp": ts}


def test_random_split_exact_counts_with_validation(tmp_path):
    src = write_log(tmp_path / "log.parquet", sized_log([1, 2, 5, 10]))
    m = ingest(src, str(tmp_path / "out"), cfg(split={"test_fraction": 0.2, "valid_fraction": 0.2, "seed": 1}))
    # n=1 -> 0/0; n=2 -> 1/0; n=5 -> 1/1; n=10 -> 2/2
    assert m["counts"] == {"train": 1 + 1 + 3 + 6, "test": 4, "valid": 3}
    d = load_dataset(str(tmp_path / "out"))
    assert np.bincount(d.test_user, minlength=4).tolist() == [0, 1, 1, 2]
    assert np.bincount(d.valid_user, minlength=4).tolist() == [0, 0, 1, 2]


def test_random_split_is_deterministic_for_a_seed(tmp_path):
    src = write_log(tmp_path / "log.parquet", small_log(per_user=10))
    fp = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        ingest(src, str(tmp_path / name), cfg(split={"seed": seed}))
        fp.append((read_manifest(str(tmp_path / name))["fingerprint"], raw_pairs(str(tmp_path / name), "test")))
    assert fp[0] == fp[1]
    assert fp[0][1] != fp[2][1]


def test_temporal_global_split_counts(tmp_path):
    ts = [1_767_225_600 + 86_400 * d for d in range(10)]  # 2026-01-01 .. 2026-01-10 UTC
    src = write_log(tmp_path / "log.parquet", {"user_id": ["a", "b"] * 5, "item_id": [f"i{k}" for k in range(10)], "timestamp": ts})
    m = ingest(src, str(tmp_path / "out"), cfg(split={"strategy": "temporal_global", "cutoff": "2026-01-09", "valid_cutoff": "2026-01-07T00:00:00"}))
    assert m["counts"] == {"train": 6, "test": 2, "valid": 2}


def test_temporal_user_split_last_n_and_fraction(tmp_path):
    src = write_log(tmp_path / "log.parquet", sized_log([1, 3, 6]))
    m = ingest(src, str(tmp_path / "a"), cfg(split={"strategy": "temporal_user", "test_last_n": 1, "valid_last_n": 1}))
    assert m["counts"] == {"train": 1 + 1 + 4, "test": 2, "valid": 2}
    d = load_dataset(str(tmp_path / "a"))
    t = d.meta["test_timestamp"]
    assert sorted(t.tolist()) == [2001, 5002]  # each user's latest
    m = ingest(src, str(tmp_path / "b"), cfg(split={"strategy": "temporal_user", "test_fraction": 0.5}))
    assert m["counts"] == {"train": 1 + 1 + 3, "test": 0 + 2 + 3}


def test_column_split_with_custom_labels_and_valid(tmp_path):
    src = write_log(tmp_path / "log.parquet", {
        "user_id": ["a", "a", "b", "b", "c", "c"], "item_id": ["x", "y", "x", "z", "y", "z"],
        "part": ["TR", "TE", "TR", "VA", "TR", "TE"],
    })
    m = ingest(src, str(tmp_path / "out"), cfg(
        columns={"timestamp": None, "split": "part"},
        split={"strategy": "column", "train_value": "TR", "test_value": "TE", "valid_value": "VA"},
    ))
    assert m["counts"] == {"train": 3, "test": 2, "valid": 1}
    assert raw_pairs(str(tmp_path / "out"), "test") == {("a", "y"), ("c", "z")}


def test_hive_tree_partition_column_as_event_filter(memfs):
    for dt in ("2026-11-01", "2026-11-02"):
        for ev, n in (("click", 3), ("view", 2), ("purchase", 1)):
            write_log(f"memory://logs/dt={dt}/event={ev}/part-0.parquet", {
                "user_id": [f"u{k}" for k in range(n)], "item_id": [f"{ev}-{dt}-{k}" for k in range(n)],
                "timestamp": [1] * n,
            })
    m = ingest("memory://logs", "memory://out/ds", cfg(columns={"event": "event"}, keep_events=["click", "purchase"]))
    assert m["source"]["n_files"] == 6 and m["source"]["rows_read"] == 12
    assert m["source"]["filtered_by_event"] == 4 and m["source"]["rows_kept"] == 8
    _, items = load_id_maps("memory://out/ds")
    assert not any("view" in s for s in items.to_pylist())
    # the partition column can also serve as the split column
    write_log("memory://sp/split=train/a.parquet", {"user_id": ["a", "b"], "item_id": ["x", "y"]})
    write_log("memory://sp/split=test/a.parquet", {"user_id": ["a"], "item_id": ["y"]})
    m = ingest("memory://sp", "memory://out/sp", cfg(columns={"split": "split", "timestamp": None}, split={"strategy": "column"}))
    assert m["counts"] == {"train": 2, "test": 1}


def test_glob_source(tmp_path):
    write_log(tmp_path / "a.parquet", sized_log([3]))
    write_log(tmp_path / "b.parquet", {"user_id": ["z", "z"], "item_id": ["q", "r"], "timestamp": [1, 2]})
    (tmp_path / "notes.txt").write_text("not data")
    m = ingest(str(tmp_path / "*.parquet"), str(tmp_path / "out"), cfg())
    assert m["source"]["n_files"] == 2 and m["n_users"] == 2


@pytest.mark.parametrize("where", ["local", "memory"])
def test_append_keeps_existing_indices(tmp_path, memfs, where):
    base = str(tmp_path) if where == "local" else "memory://t"
    write_log(f"{base}/v1.parquet", small_log(n_users=10, per_user=5))
    out = f"{base}/out"
    m1 = ingest(f"{base}/v1.parquet", out, cfg())
    u1, i1 = load_id_maps(out)
    d1 = load_dataset(out)
    write_log(f"{base}/v2.parquet", {
        "user_id": ["new1", "u3", "u3", "new2", "new1", "new1"],
        "item_id": ["i0", "brand-new", "i1", "i1", "brand-new", "i2"],
        "timestamp": [9] * 6,
    })
    existing = set(zip(d1.train_user.tolist(), d1.train_item.tolist())) | set(zip(d1.test_user.tolist(), d1.test_item.tolist()))
    u3 = u1.to_pylist().index("u3")
    i1_idx = i1.to_pylist().index("i1")
    m2 = ingest(f"{base}/v2.parquet", out, cfg(split={"test_fraction": 0.5}), append=True)
    u2, i2 = load_id_maps(out)
    assert u2.to_pylist()[: len(u1)] == u1.to_pylist() and i2.to_pylist()[: len(i1)] == i1.to_pylist()
    assert u2.to_pylist()[len(u1):] == ["new1", "new2"] and i2.to_pylist()[len(i1):] == ["brand-new"]
    # locally the plain versioned name; on an object store with this attempt's token before .parquet
    assert m2["version"] == 2 and re.fullmatch(r"train\.v2(\.[0-9a-f]{12})?\.parquet", m2["files"]["train"]["path"])
    known = int((u3, i1_idx) in existing)
    assert m2["source"]["known_pairs_dropped"] == known
    d2 = load_dataset(out)
    # old edges keep their split
    assert set(zip(d1.test_user.tolist(), d1.test_item.tolist())) <= set(zip(d2.test_user.tolist(), d2.test_item.tolist()))
    assert set(zip(d1.train_user.tolist(), d1.train_item.tolist())) <= set(zip(d2.train_user.tolist(), d2.train_item.tolist()))
    assert d2.n_train + len(d2.test_user) == m1["n_interactions"] + 6 - known
    assert m2["history"][0]["version"] == 1
    # superseded files are gone
    import fsspec

    fs, path = fsspec.core.url_to_fs(out)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False)) == sorted(
        [e["path"] for e in m2["files"].values()] + ["manifest.json"])


def _failing_writer(monkeypatch, after: int):
    real = AtomicOutput.write_parquet
    calls = {"n": 0}

    def write(self, name, table):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError("injected disk failure")
        return real(self, name, table)

    monkeypatch.setattr(AtomicOutput, "write_parquet", write)


def test_failed_write_leaves_nothing_local(tmp_path, monkeypatch):
    src = write_log(tmp_path / "log.parquet", small_log())
    _failing_writer(monkeypatch, after=2)
    with pytest.raises(OSError, match="injected"):
        ingest(src, str(tmp_path / "out"), cfg())
    assert sorted(os.listdir(tmp_path)) == ["log.parquet"]  # no output, no staging dir


def test_failed_write_leaves_nothing_memory(memfs, monkeypatch):
    src = write_log("memory://src/log.parquet", small_log())
    _failing_writer(monkeypatch, after=2)
    with pytest.raises(OSError):
        ingest(src, "memory://out/ds", cfg())
    assert not memfs.exists("/out/ds/manifest.json")
    assert memfs.find("/out") == []


@pytest.mark.parametrize("where", ["local", "memory"])
def test_failed_overwrite_and_append_keep_existing_dataset(tmp_path, memfs, monkeypatch, where):
    base = str(tmp_path) if where == "local" else "memory://w"
    src = write_log(f"{base}/log.parquet", small_log())
    out = f"{base}/out"
    m1 = ingest(src, out, cfg())
    src2 = write_log(f"{base}/log2.parquet", small_log(seed=5, n_users=40))
    _failing_writer(monkeypatch, after=3)
    for kw in ({"overwrite": True}, {"append": True}):
        with pytest.raises(OSError):
            ingest(src2, out, cfg(), **kw)
        assert read_manifest(out) == json.loads(json.dumps(m1))
        assert load_dataset(out).fingerprint == m1["fingerprint"]  # verify=True: every file intact
    if where == "local":
        assert sorted(os.listdir(tmp_path)) == ["log.parquet", "log2.parquet", "out"]
    monkeypatch.undo()
    m2 = ingest(src2, out, cfg(), overwrite=True)
    assert m2["n_users"] == 40 and load_dataset(out).fingerprint == m2["fingerprint"]


def test_cli_run_ingest_from_args(tmp_path, capsys):
    src = write_log(tmp_path / "log.parquet", {
        "uid": ["a", "a", "b", "b"], "iid": ["x", "y", "x", "z"], "ev": ["click", "view", "click", "click"], "t": [1, 2, 3, 4],
    })
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("columns:\n  user: uid\n  item: iid\nsplit:\n  strategy: temporal_user\n")
    parser = argparse.ArgumentParser()
    add_ingest_arguments(parser)
    args = parser.parse_args([src, str(tmp_path / "out"), "--config", str(cfg_file), "--timestamp-col", "t",
                              "--event-col", "ev", "--keep-events", "click", "--test-last-n", "1", "--no-progress",
                              "--set", "split.seed=3"])
    assert run_ingest_from_args(args) == 0
    out = capsys.readouterr().out
    assert "2 users" in out and "train 2" in out and "test 1" in out and "rows/s" in out
    args = parser.parse_args([src, str(tmp_path / "out2"), "--user-col", "nope", "--no-progress"])
    assert run_ingest_from_args(args) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "log.parquet" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out2").exists()


def test_cli_module_exit_status(tmp_path):
    src = write_log(tmp_path / "log.parquet", {"user_id": [1.5, 2.5], "item_id": ["x", "y"]})
    run = subprocess.run([sys.executable, "-m", "gnaq_dist.ingest.cli", src, str(tmp_path / "out"), "--no-progress"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "user_id" in run.stderr and "double" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.shared_data
def test_valid_fraction_carves_validation_from_a_given_train_split(tmp_path):
    """A split column (or a LightGCN folder) has train and test only: valid_fraction holds
    out that share of each user's train rows; test stays as given, every user keeps train."""
    log = small_log(n_users=40, per_user=8)
    log["split"] = ["test" if i % 4 == 0 else "train" for i in range(len(log["user_id"]))]
    src = write_log(tmp_path / "log.parquet", log)
    columns = {"timestamp": None, "split": "split"}
    plain = ingest(src, str(tmp_path / "plain"), cfg(columns=columns, split={"strategy": "column"}))
    m = ingest(src, str(tmp_path / "v"), cfg(columns=columns, split={"strategy": "column", "valid_fraction": 0.25}))
    assert m["counts"]["test"] == plain["counts"]["test"]
    assert m["counts"]["train"] + m["counts"]["valid"] == plain["counts"]["train"]
    assert raw_pairs(str(tmp_path / "v"), "test") == raw_pairs(str(tmp_path / "plain"), "test")
    assert raw_pairs(str(tmp_path / "v"), "train") | raw_pairs(str(tmp_path / "v"), "valid") == \
        raw_pairs(str(tmp_path / "plain"), "train")
    d, p = load_dataset(str(tmp_path / "v")), load_dataset(str(tmp_path / "plain"))
    per_user = np.bincount(p.train_user, minlength=p.n_users)
    held = np.bincount(d.valid_user, minlength=d.n_users)
    wanted = np.where(per_user >= 2, np.clip(np.floor(0.25 * per_user + 0.5), 1, per_user - 1), 0)
    assert (held == wanted).all() and (np.bincount(d.train_user, minlength=d.n_users) >= 1)[per_user > 0].all()
    again = ingest(src, str(tmp_path / "v2"), cfg(columns=columns, split={"strategy": "column", "valid_fraction": 0.25}))
    assert raw_pairs(str(tmp_path / "v2"), "valid") == raw_pairs(str(tmp_path / "v"), "valid") and again["counts"] == m["counts"]
    # A LightGCN folder likewise.
    folder = tmp_path / "lgcn"
    folder.mkdir()
    (folder / "train.txt").write_text("0 1 2 3 4\n1 0 2 4 5\n2 3\n")
    (folder / "test.txt").write_text("0 5\n1 3\n2 0\n")
    m = ingest(str(folder), str(tmp_path / "lg"), cfg(format="lightgcn", split={"valid_fraction": 0.5}))
    assert m["counts"] == {"train": 5, "test": 3, "valid": 4}  # users 0, 1: 2 of 4 each; user 2 keeps its one
    # A column that already labels validation rows is not carved twice.
    log["split"][1] = "valid"
    src = write_log(tmp_path / "log2.parquet", log)
    with pytest.raises(GnaqInputError, match="already has validation rows"):
        ingest(src, str(tmp_path / "x"), cfg(columns=columns, split={"strategy": "column", "valid_fraction": 0.25}))
    assert not (tmp_path / "x").exists()


def test_lastfm_column_split_with_weight(shared_data, tmp_path):
    src = shared_data / "lastfm" / "interactions.parquet"
    if not src.exists():
        pytest.skip(f"{src} not found")
    m = ingest(str(src), str(tmp_path / "lastfm"), cfg(columns={"weight": "weight", "split": "split"}, split={"strategy": "column"}))
    assert (m["n_users"], m["n_items"]) == (1_880, 4_489)
    assert m["counts"] == {"train": 42_135, "test": 10_533}
    d = load_dataset(str(tmp_path / "lastfm"))
    assert len(np.setdiff1d(d.test_user, d.train_user)) == 2  # test-only users kept, with indices
    assert len(np.setdiff1d(d.test_item, d.train_item)) == 13
    assert d.meta["train_weight"].dtype == np.float32 and m["has_weight"]


@pytest.mark.shared_data
def test_gowalla_lightgcn_conversion(shared_data, tmp_path):
    src = shared_data / "gowalla"
    if not (src / "train.txt").exists():
        pytest.skip(f"{src}/train.txt not found")
    m = ingest(str(src), str(tmp_path / "gowalla"), cfg(format="lightgcn"))
    assert (m["n_users"], m["n_items"]) == (29_858, 40_981)
    assert m["counts"] == {"train": 810_128, "test": 217_242}
    users, items = load_id_maps(str(tmp_path / "gowalla"))
    assert users.to_pylist() == list(range(29_858)) and items.type == pa.int64()
    with open(src / "test.txt") as handle:
        first = [int(x) for x in handle.readline().split()]
    d = load_dataset(str(tmp_path / "gowalla"))
    assert sorted(d.test_item[d.test_user == first[0]].tolist()) == sorted(first[1:])


def test_dedup_ties_and_no_timestamp_keep_the_last_row():
    from gnaq_dist.ingest.clean import dedup
    from gnaq_dist.ingest.edges import Edges

    u = np.array([0, 0, 1, 0, 1], np.int32)
    i = np.array([0, 0, 0, 0, 1], np.int32)
    w = np.array([1, 2, 3, 4, 5], np.float32)
    kept, dropped = dedup(Edges(u, i, np.array([7, 9, 1, 9, 2]), w))
    assert dropped == 2 and kept.weight.tolist() == [3, 4, 5]  # tie at t=9: the later row; file order kept
    kept, dropped = dedup(Edges(u, i, None, w))
    assert dropped == 2 and kept.weight.tolist() == [3, 4, 5]
