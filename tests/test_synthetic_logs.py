"""``gnaq generate``: the streamed synthetic interaction log (gnaq_dist/synthetic_logs.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from gnaq_dist.cli import main
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.synthetic_logs import LogSpec, generate_log, hidden_clusters

SMALL = LogSpec(users=2000, items=1000, rows=30000, seed=3)


def _read(path: Path) -> pa.Table:
    return ds.dataset(str(path), format="parquet").to_table()


def _ints(column: pa.ChunkedArray) -> np.ndarray:
    return np.array([int(s[1:]) for s in column.to_pylist()], dtype=np.int64)


@pytest.fixture(scope="module")
def small_log(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "log"
    generate_log(out, SMALL, files=2, row_group_rows=7000, progress=False)
    return out


def test_schema_files_and_row_groups(small_log: Path):
    files = sorted(small_log.glob("*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet"]
    for f in files:
        meta = pq.ParquetFile(f).metadata
        assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [7000, 7000, 1000]
    table = _read(small_log)
    assert table.schema == pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())])
    assert table.num_rows == 30000
    users, items = _ints(table["user_id"]), _ints(table["item_id"])
    assert users.min() >= 0 and users.max() < SMALL.users and items.min() >= 0 and items.max() < SMALL.items
    ts = table["timestamp"].to_numpy()
    assert ts.min() >= SMALL.start and ts.max() < SMALL.start + SMALL.span_days * 86400 + 3600
    assert np.corrcoef(np.arange(ts.size), ts)[0, 1] > 0.99  # file order is roughly time order
    meta = json.loads((small_log / "_generate.json").read_text())
    assert meta["rows"] == 30000 and meta["clusters"] == 32 and meta["spec"]["seed"] == 3
    assert not list(small_log.parent.glob(".*"))  # no temporary left behind


def test_single_file_and_weight(tmp_path: Path):
    out = tmp_path / "log.parquet"
    generate_log(out, LogSpec(users=50, items=20, rows=500, weight=True), row_group_rows=128, progress=False)
    table = pq.read_table(out)
    assert table.column_names == ["user_id", "item_id", "timestamp", "weight"]
    assert table.schema.field("weight").type == pa.float32()
    w = table["weight"].to_numpy()
    assert set(np.unique(w)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert pq.ParquetFile(out).metadata.num_row_groups == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.parquet"]


def test_deterministic_and_independent_of_io_sizes(tmp_path: Path, small_log: Path):
    other = tmp_path / "again"
    generate_log(other, SMALL, files=3, row_group_rows=4096, progress=False)
    assert _read(other).equals(_read(small_log))
    changed = tmp_path / "seed4"
    generate_log(changed, LogSpec(users=2000, items=1000, rows=30000, seed=4), progress=False)
    assert not _read(changed)["item_id"].equals(_read(small_log)["item_id"])


def test_power_law_shape(small_log: Path):
    table = _read(small_log)
    item_rows = np.sort(np.bincount(_ints(table["item_id"]), minlength=SMALL.items))[::-1]
    user_rows = np.sort(np.bincount(_ints(table["user_id"]), minlength=SMALL.users))[::-1]
    top_items = item_rows[: SMALL.items // 100].sum() / item_rows.sum()
    top_users = user_rows[: SMALL.users // 100].sum() / user_rows.sum()
    assert top_items > 0.10  # top 1% of items: > 10x their uniform share (measured 0.13)
    assert top_users > 0.05  # top 1% of users: > 5x (measured 0.14)
    assert user_rows[0] > 10 * np.median(user_rows) and item_rows[0] > 20 * np.median(item_rows)
    # A power-law tail: the rank-frequency slope of items on log-log axes is about -1.
    ranks = np.arange(10, 500)
    slope = np.polyfit(np.log(ranks + SMALL.item_offset), np.log(item_rows[ranks]), 1)[0]
    assert -1.4 < slope < -0.6


def test_streaming_memory_does_not_grow_with_rows(tmp_path: Path):
    script = textwrap.dedent("""
        import resource, sys
        from gnaq_dist.synthetic_logs import LogSpec, generate_log
        generate_log(sys.argv[1], LogSpec(users=20000, items=5000, rows=int(sys.argv[2])),
                     row_group_rows=50000, progress=False)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    """)
    peaks = {}
    for rows in (100_000, 1_500_000):
        res = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"r{rows}"), str(rows)],
                             capture_output=True, text=True, check=True)
        peaks[rows] = float(res.stdout.split()[-1])
    assert pq.ParquetFile(tmp_path / "r1500000" / "part-00000.parquet").metadata.num_row_groups == 30
    assert peaks[1_500_000] - peaks[100_000] < 20, peaks  # MiB; 15x the rows


def test_ingest_accepts_it_and_the_structure_is_learnable(tmp_path: Path, small_log: Path):
    import torch

    from gnaq_dist.config import from_dict, load_config
    from gnaq_dist.dataset import load_dataset, load_id_maps
    from gnaq_dist.evaluation import evaluate_ranking, finalize
    from gnaq_dist.graph import interactions_csr
    from gnaq_dist.ingest import IngestConfig, ingest
    from gnaq_dist.train.config import TrainConfig
    from gnaq_dist.train.local import train_local

    manifest = ingest(str(small_log), str(tmp_path / "ds"), from_dict(IngestConfig, {"progress": False}))
    assert manifest["source"]["rows_read"] == 30000 and manifest["has_timestamp"]
    assert manifest["source"]["n_files"] == 2  # _generate.json is skipped
    data = load_dataset(str(tmp_path / "ds"))
    assert data.n_users == 2000 and data.n_items >= 990

    # Held-out items share the user's hidden cluster far more often than chance (1/32).
    user_ids, item_ids = load_id_maps(str(tmp_path / "ds"))
    u_cluster, i_cluster = hidden_clusters(SMALL)
    u_raw = _ints(pa.chunked_array([user_ids]))[data.test_user]
    i_raw = _ints(pa.chunked_array([item_ids]))[data.test_item]
    assert (u_cluster[u_raw] == i_cluster[i_raw]).mean() > 0.6  # measured 0.75

    # A short GNAQ 2-bit run beats the popularity ranking by a wide margin.
    train = interactions_csr(data.train_user, data.train_item, data.n_users, data.n_items)
    test = interactions_csr(data.test_user, data.test_item, data.n_users, data.n_items)
    popularity = torch.from_numpy(np.bincount(data.train_item, minlength=data.n_items).astype(np.float32))
    pop = finalize(evaluate_ranking(torch.ones(data.n_users, 1), popularity[:, None], None, train, test, ks=(20,)))
    config = load_config(TrainConfig, [], [
        "model.method=gnaq", "model.bits=2", "model.dim=32", "schedule.epochs=8", "schedule.warmup_epochs=5",
        "schedule.batch_size=2048", "schedule.eval_every=0", "optim.lr=0.01", "eval.ks=[20]", "progress=false",
    ])
    result = train_local(config, data)
    assert result.metrics["recall@20"] > 2.5 * pop["recall@20"], (result.metrics, pop)  # measured 0.59 vs 0.14


@pytest.mark.parametrize("args, message", [
    (["--users", "0", "--items", "5", "--rows", "10"], "--users"),
    (["--users", "5", "--items", "5", "--rows", "-3"], "--rows"),
    (["--users", "5", "--items", "5", "--rows", "10", "--row-group-rows", "0"], "--row-group-rows"),
    (["--users", "5", "--items", "5", "--rows", "10", "--clusters", "6"], "--clusters"),
    (["--users", "5", "--items", "5", "--rows", "3", "--files", "4"], "--files"),
])
def test_bad_arguments_exit_2(tmp_path: Path, capsys, args, message):
    assert main(["generate", str(tmp_path / "out"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert "gnaq generate: error:" in err and message in err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_missing_flag_and_overwrite(tmp_path: Path, capsys):
    out = tmp_path / "log"
    common = ["--users", "10", "--items", "5", "--rows", "100", "--no-progress"]
    assert main(["generate", str(out), *common]) == 0
    assert main(["generate", str(out), *common]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "x.parquet"), *common, "--files", "2"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(tmp_path / "y"), "--users", "10", "--items", "5"])  # no --rows
    assert exc.value.code == 2
    assert main(["generate", str(out), *common[:-2], "400", "--no-progress", "--overwrite"]) == 0
    assert _read(out).num_rows == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]


def test_failure_leaves_nothing(tmp_path: Path, monkeypatch):
    import gnaq_dist.synthetic_logs as sl

    calls = {"n": 0}
    real = sl._table

    def flaky(rows, schema):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(rows, schema)

    monkeypatch.setattr(sl, "_table", flaky)
    with pytest.raises(OSError):
        generate_log(tmp_path / "log", LogSpec(users=10, items=5, rows=1000), row_group_rows=100, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(GnaqInputError, match="local paths"):
        generate_log("s3://bucket/log", LogSpec(users=10, items=5, rows=10), progress=False)
