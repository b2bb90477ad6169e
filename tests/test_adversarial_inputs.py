"""Hostile input, through the real ``gnaq`` entry point (issue 28, items 2 and 5).

Each case runs ``gnaq_dist.cli.main`` on real Parquet files (or real gnaq outputs) and
asserts the contract: exit status 2, exactly one line on stderr naming the path (and the
column and row, for bad values), nothing on stdout, and the directory tree it worked in
byte for byte as it was (nothing written, nothing deleted). docs/reliability.md maps each
guarantee to the tests here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_log
from gnaq_dist.cli import main

# -- helpers -----------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, str]:
    """Every directory, file (sha256) and link under ``root``: what "nothing changed" compares."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel + "/"] = "dir"
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            key = os.path.relpath(path, root)
            if os.path.islink(path):
                out[key] = "link:" + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as handle:
                    out[key] = hashlib.sha256(handle.read()).hexdigest()
    return out


def memory_tree(fs) -> dict[str, bytes]:
    return {p: fs.cat(p) for p in fs.find("/")}


def refused(capsys, root: Path | None, argv: list[str], *needles: str, memfs=None) -> str:
    """Run ``gnaq ARGV``: exit 2, one stderr line with every needle, nothing changed under
    ``root`` (or in ``memfs``). Returns the line."""
    before = tree(root) if root is not None else None
    mem_before = memory_tree(memfs) if memfs is not None else None
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, (rc, captured.err)
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"gnaq {argv[0]}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert captured.out == ""
    if root is not None:
        assert tree(root) == before, "something was written or deleted"
    if memfs is not None:
        assert memory_tree(memfs) == mem_before, "something was written or deleted"
    return lines[0]


def ok(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def log(n_users: int = 6, per: int = 4, **columns) -> dict:
    """A small interaction log: every user has ``per`` rows (so a random split has test rows)."""
    n = n_users * per
    data = {
        "user_id": [f"u{k // per}" for k in range(n)],
        "item_id": [f"i{(k * 7) % 11}" for k in range(n)],
        "timestamp": [1_700_000_000 + 60 * k for k in range(n)],
    }
    data.update(columns)
    return data


def ingested(capsys, tmp_path: Path, name: str = "ds", *extra: str) -> Path:
    src = write_log(tmp_path / f"{name}-log.parquet", log())
    out = tmp_path / name
    ok(capsys, ["ingest", src, str(out), "--no-progress", *extra])
    assert (out / "manifest.json").is_file()
    return out


def documents(root: Path) -> Path:
    """Someone's folder that is no gnaq output."""
    docs = root / "documents"
    (docs / "photos").mkdir(parents=True)
    (docs / "thesis.txt").write_text("four years of work")
    (docs / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return docs


def bundle(root: Path) -> Path:
    """A real bundle (fp kind: a float32 table) from the real writer."""
    from gnaq_dist.export import export_bundle
    from gnaq_dist.synthetic import clustered_interactions

    data = clustered_interactions(n_users=30, n_items=20, seed=1)
    out = root / "bundle"
    table = np.random.default_rng(0).standard_normal((data.n_users + data.n_items, 4)).astype(np.float32)
    export_bundle(str(out), "fp", table, data, 1, {})
    assert (out / "bundle.json").is_file()
    return out


def checkpoint(root: Path) -> Path:
    """A checkpoint directory from the real checkpoint writer (one shard, manifest last)."""
    from gnaq_dist import checkpoint as ckpt
    from gnaq_dist.synthetic import clustered_interactions

    store = ckpt.CheckpointStore(str(root / "checkpoints"))
    name = ckpt.checkpoint_name(7)
    files = {"shard-00000-of-00001.parquet": store.write_file(
        name, "shard-00000-of-00001.parquet", ckpt.parquet_bytes(ckpt.residual_table([])))}
    config = {"model": {"method": "gnaq", "bits": 2, "dim": 16, "num_layers": 2, "phi": "identity",
                        "level_dtype": "float16"}}
    manifest = ckpt.new_manifest(step=7, epoch=7, phase="quantized", shard_method="gnaq", world_size=1,
                                 config=config, data=ckpt.data_key(clustered_interactions(30, 20, seed=1)),
                                 partition={}, files=files, progress={}, history=[])
    uri = store.commit(name, manifest)
    assert (Path(uri) / "manifest.json").is_file()
    return Path(uri)


def generated(capsys, root: Path) -> Path:
    out = root / "synthetic-log"
    ok(capsys, ["generate", str(out), "--users", "10", "--items", "5", "--rows", "60", "--no-progress"])
    assert (out / "_generate.json").is_file()
    return out


# == item 2: --overwrite replaces only what gnaq wrote ==========================================


def test_output_kinds_match_the_writers_constants():
    from gnaq_dist import checkpoint as ckpt
    from gnaq_dist.bundle import BUNDLE_FORMAT, BUNDLE_JSON
    from gnaq_dist.distributed.partition_store import KIND
    from gnaq_dist.ingest.writer import FORMAT
    from gnaq_dist.overwrite import OUTPUT_KINDS
    from gnaq_dist.storage import MANIFEST
    from gnaq_dist.synthetic_logs import META_FILE

    assert OUTPUT_KINDS["dataset"][0] == MANIFEST and OUTPUT_KINDS["dataset"][1]({"format": FORMAT})
    assert OUTPUT_KINDS["checkpoint"][0] == ckpt.MANIFEST and OUTPUT_KINDS["checkpoint"][1]({"format": ckpt.FORMAT})
    assert OUTPUT_KINDS["partition"][0] == MANIFEST and OUTPUT_KINDS["partition"][1]({"kind": KIND})
    assert OUTPUT_KINDS["bundle"][0] == BUNDLE_JSON and OUTPUT_KINDS["bundle"][1]({"format": BUNDLE_FORMAT})
    assert OUTPUT_KINDS["generated log"][0] == META_FILE


def test_ingest_overwrite_refuses_a_folder_of_documents(tmp_path, capsys):
    src = write_log(tmp_path / "log.parquet", log())
    docs = documents(tmp_path)
    refused(capsys, tmp_path, ["ingest", src, str(docs), "--overwrite", "--no-progress"],
            str(docs), "not a gnaq dataset", "left as it is")


def test_ingest_overwrite_refuses_a_file(tmp_path, capsys):
    src = write_log(tmp_path / "log.parquet", log())
    target = tmp_path / "report.pdf"
    target.write_bytes(b"%PDF-1.7 mine")
    refused(capsys, tmp_path, ["ingest", src, str(target), "--overwrite", "--no-progress"],
            str(target), "is a file")


@pytest.mark.parametrize("kind", ["bundle", "checkpoint", "generated log"])
def test_ingest_overwrite_refuses_another_kind_of_gnaq_output(tmp_path, capsys, kind):
    src = write_log(tmp_path / "log.parquet", log())
    target = {"bundle": lambda: bundle(tmp_path), "checkpoint": lambda: checkpoint(tmp_path),
              "generated log": lambda: generated(capsys, tmp_path)}[kind]()
    refused(capsys, tmp_path, ["ingest", src, str(target), "--overwrite", "--no-progress"],
            str(target), f"a gnaq {kind}, not a dataset")


def test_ingest_overwrite_refuses_a_dataset_holding_foreign_files(tmp_path, capsys):
    ds = ingested(capsys, tmp_path)
    (ds / "my-notes.txt").write_text("do not lose")
    src = write_log(tmp_path / "log2.parquet", log(n_users=8))
    refused(capsys, tmp_path, ["ingest", src, str(ds), "--overwrite", "--no-progress"],
            str(ds), "'my-notes.txt'", "does not list")


def test_ingest_overwrite_refuses_a_manifest_of_another_format(tmp_path, capsys):
    src = write_log(tmp_path / "log.parquet", log())
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"format": "someone-elses", "files": {}}))
    (fake / "data.bin").write_bytes(b"precious")
    refused(capsys, tmp_path, ["ingest", src, str(fake), "--overwrite", "--no-progress"], "not a gnaq dataset")
    (fake / "manifest.json").write_text("[1, 2, 3]")  # JSON, but not an object
    refused(capsys, tmp_path, ["ingest", src, str(fake), "--overwrite", "--no-progress"], "not a gnaq dataset")


def test_ingest_overwrite_still_replaces_a_dataset_and_an_empty_folder(tmp_path, capsys):
    from gnaq_dist.dataset import read_manifest

    ds = ingested(capsys, tmp_path)
    src = write_log(tmp_path / "log2.parquet", log(n_users=9))
    ok(capsys, ["ingest", src, str(ds), "--overwrite", "--no-progress"])
    assert read_manifest(str(ds))["n_users"] == 9
    empty = tmp_path / "empty"
    empty.mkdir()
    ok(capsys, ["ingest", src, str(empty), "--overwrite", "--no-progress"])
    assert read_manifest(str(empty))["n_users"] == 9
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging debris


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
@pytest.mark.parametrize("layout", ["same dir", "same file", "out inside source", "out contains source",
                                    "symlink to source"])
def test_ingest_out_overlapping_source_is_refused(tmp_path, capsys, layout, flags):
    logs = tmp_path / "logs"
    write_log(logs / "day1.parquet", log())
    write_log(logs / "day2.parquet", log(n_users=3))
    if layout == "symlink to source":
        os.symlink(logs, tmp_path / "alias")
    src, out, how = {
        "same dir": (logs, logs, "is the same location as"),
        "same file": (logs / "day1.parquet", logs / "day1.parquet", "is the same location as"),
        "out inside source": (logs, logs / "dataset", "is inside"),
        "out contains source": (logs / "day1.parquet", logs, "contains"),
        "symlink to source": (logs, tmp_path / "alias", "is the same location as"),
    }[layout]
    refused(capsys, tmp_path, ["ingest", str(src), str(out), "--no-progress", *flags], str(out), how, "SOURCE")


def test_ingest_append_with_source_inside_the_dataset_is_refused(tmp_path, capsys):
    ds = ingested(capsys, tmp_path)
    refused(capsys, tmp_path, ["ingest", str(ds / "train.parquet"), str(ds), "--append", "--no-progress"],
            "contains SOURCE")


def test_ingest_source_equal_to_out_on_an_object_store(memfs, capsys):
    src = write_log("memory://raw/logs/a.parquet", log())
    refused(capsys, None, ["ingest", "memory://raw/logs", "memory://raw/logs", "--overwrite", "--no-progress"],
            "memory://raw/logs", "is the same location as", memfs=memfs)
    refused(capsys, None, ["ingest", src, "memory://raw", "--overwrite", "--no-progress"], "contains", memfs=memfs)


def test_glob_source_overlaps_out_only_where_it_could_reach_it(tmp_path, capsys):
    logs = tmp_path / "logs"
    write_log(logs / "a.parquet", log())
    # *.parquet cannot reach logs/ds/...: allowed, and a later ingest of the same glob still works
    ok(capsys, ["ingest", str(logs / "*.parquet"), str(logs / "ds"), "--no-progress"])
    ok(capsys, ["ingest", str(logs / "*.parquet"), str(tmp_path / "again"), "--no-progress"])
    for pattern in ("*", "**/*.parquet", "d*"):
        refused(capsys, tmp_path, ["ingest", str(logs / pattern), str(logs / "ds2"), "--no-progress"],
                "overlaps SOURCE")
    refused(capsys, tmp_path, ["ingest", str(logs / "*.parquet"), str(tmp_path), "--overwrite", "--no-progress"],
            "overlaps SOURCE")


def test_export_out_overlapping_the_checkpoint_is_refused(tmp_path, capsys):
    ck = checkpoint(tmp_path)
    refused(capsys, tmp_path, ["export", str(ck), str(ck), "--overwrite"], "is the same location as CHECKPOINT")
    refused(capsys, tmp_path, ["export", str(ck), str(ck / "bundle")], "is inside CHECKPOINT")
    refused(capsys, tmp_path, ["export", str(ck), str(ck.parent), "--overwrite"], "contains CHECKPOINT")


@pytest.mark.parametrize("target", ["dataset", "documents", "checkpoint"])
def test_export_overwrite_refuses_what_is_not_a_bundle(tmp_path, capsys, target):
    ck = checkpoint(tmp_path / "run")
    out = {"dataset": lambda: ingested(capsys, tmp_path), "documents": lambda: documents(tmp_path),
           "checkpoint": lambda: checkpoint(tmp_path / "other")}[target]()
    refused(capsys, tmp_path, ["export", str(ck), str(out), "--overwrite"], str(out), "left as it is")


def test_export_existing_out_without_overwrite_is_refused_before_reading(tmp_path, capsys):
    ck = checkpoint(tmp_path)
    out = bundle(tmp_path)
    refused(capsys, tmp_path, ["export", str(ck), str(out)], "already exists")


def test_recommend_output_replaces_only_a_recommendation_list(tmp_path, capsys):
    """``recommend --output`` used to replace any file (an interaction log, someone's notes)."""
    from gnaq_dist.serving import Bundle

    b = bundle(tmp_path)

    raw = Bundle.load(str(b)).user_ids[0]
    src = write_log(tmp_path / "log.parquet", log())
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own,notes\n")
    for target in (src, str(notes)):
        refused(capsys, tmp_path, ["recommend", str(b), "--user", str(raw), "--output", target],
                target, "is not a recommendation list")
    for name in ("recs.csv", "recs.parquet"):  # its own output: written, then replaced
        ok(capsys, ["recommend", str(b), "--user", str(raw), "--output", str(tmp_path / name), "-k", "3"])
        ok(capsys, ["recommend", str(b), "--user", str(raw), "--output", str(tmp_path / name), "-k", "2"])
    assert pq.read_table(tmp_path / "recs.parquet").num_rows == 2
    assert len((tmp_path / "recs.csv").read_text().splitlines()) == 3


def test_generate_overwrite_replaces_only_a_generated_log(tmp_path, capsys):
    common = ["--users", "10", "--items", "5", "--rows", "60", "--no-progress", "--overwrite"]
    refused(capsys, tmp_path, ["generate", str(documents(tmp_path)), *common], "not a gnaq generated log")
    foreign = write_log(tmp_path / "sales.parquet", {"order": [1, 2], "amount": [9.5, 3.0]})
    refused(capsys, tmp_path, ["generate", foreign, *common], "is a file")
    own = tmp_path / "own.parquet"
    ok(capsys, ["generate", str(own), *common[:-1]])
    ok(capsys, ["generate", str(own), *common])  # its own single-file output: replaced
    logdir = generated(capsys, tmp_path)
    ok(capsys, ["generate", str(logdir), *common])


def test_partition_out_overlapping_or_not_a_partition_is_refused(tmp_path, capsys):
    ds = ingested(capsys, tmp_path)
    refused(capsys, tmp_path, ["partition", str(ds), str(ds), "--workers", "2", "--overwrite"],
            "is the same location as DATASET")
    refused(capsys, tmp_path, ["partition", str(ds), str(ds / "owners"), "--workers", "2"], "is inside DATASET")
    docs = documents(tmp_path)
    refused(capsys, tmp_path, ["partition", str(ds), str(docs), "--workers", "2", "--overwrite"],
            "not a gnaq partition")


# == item 5: ingest validates every value, naming file, column and row ============================


def test_unsigned_ids_above_int64_are_refused(tmp_path, capsys):
    src = write_log(tmp_path / "log.parquet", {
        "user_id": pa.array([1, 2, 2**63 + 5, 3], pa.uint64()), "item_id": ["a", "b", "c", "d"],
        "timestamp": [1, 2, 3, 4]})
    refused(capsys, tmp_path, ["ingest", src, str(tmp_path / "out"), "--no-progress"],
            "log.parquet", "'user_id'", "row 2", str(2**63 + 5), "int64")


def invalid_utf8(values: list[bytes]) -> pa.Array:
    """A string array holding the given bytes, unchecked (as a foreign writer may store them)."""
    binary = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(binary), binary.buffers())


@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_invalid_utf8_ids_are_refused(tmp_path, capsys, column):
    data = log(n_users=2, per=2)
    data[column] = invalid_utf8([b"ok", b"fine", b"\xff\xfe\xfd", b"also ok"])
    src = write_log(tmp_path / "log.parquet", data)
    refused(capsys, tmp_path, ["ingest", src, str(tmp_path / "out"), "--no-progress"],
            "log.parquet", repr(column), "row 2", "UTF-8")


def test_invalid_utf8_split_label_is_refused(tmp_path, capsys):
    data = log(n_users=2, per=2, split=invalid_utf8([b"train", b"test", b"train", b"t\xe9st"]))
    src = write_log(tmp_path / "log.parquet", data)
    refused(capsys, tmp_path, ["ingest", src, str(tmp_path / "out"), "--split", "column", "--split-col", "split",
                               "--no-progress"], "'split'", "row 3", "UTF-8")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e300])
def test_non_finite_weights_are_refused_like_nulls(tmp_path, capsys, bad):
    weights = [1.0] * 24
    weights[5] = bad
    src = write_log(tmp_path / "log.parquet", log(weight=pa.array(weights, pa.float64())))
    refused(capsys, tmp_path, ["ingest", src, str(tmp_path / "out"), "--weight-col", "weight", "--no-progress"],
            "log.parquet", "'weight'", "row 5", "finite")


def test_row_numbers_count_file_rows_across_batches_and_event_filters(tmp_path, capsys):
    weights = [1.0] * 24
    weights[13] = float("nan")
    events = ["view" if k % 2 else "buy" for k in range(24)]  # row 13 is kept (view), half are filtered
    src = write_log(tmp_path / "log.parquet", log(weight=weights, event=events))
    refused(capsys, tmp_path, ["ingest", src, str(tmp_path / "out"), "--weight-col", "weight", "--event-col", "event",
                               "--keep-events", "view", "--set", "batch_rows=4", "--no-progress"], "row 13")


@pytest.mark.parametrize("values,needle", [
    (pa.array([1, 2, 2**62, 4], pa.int64()), str(2**62)),
    (pa.array([1, 2, -2**63, 4], pa.int64()), str(-2**63)),  # the missing-time sentinel: not read as null
    (pa.array([1, 2, 2**63 + 1, 4], pa.uint64()), "int64"),
    (pa.array([1, 2, 10**15, 4], pa.timestamp("s")), "outside years 1..9999"),
    (pa.array([1, 2, -2**31, 4], pa.date32()), "outside years 1..9999"),
], ids=["2^62", "int64-min", "uint64", "timestamp-s", "date32"])
def test_timestamps_out_of_range_are_refused(tmp_path, capsys, values, needle):
    src = write_log(tmp_path / "log.parquet", {"user_id": ["a", "a", "b", "b"], "item_id": ["x", "y", "x", "y"],
                                               "timestamp": values})
    refused(capsys, tmp_path, ["ingest", src, str(tmp_path / "out"), "--no-progress"],
            "log.parquet", "'timestamp'", "row 2", needle)


def test_null_timestamps_are_still_allowed(tmp_path, capsys):
    from gnaq_dist.dataset import load_dataset

    times = [1_700_000_000 + k for k in range(24)]
    times[3] = None
    src = write_log(tmp_path / "log.parquet", log(timestamp=pa.array(times, pa.int64())))
    ok(capsys, ["ingest", src, str(tmp_path / "out"), "--no-progress"])
    data = load_dataset(str(tmp_path / "out"))
    assert data.n_train + len(data.test_user) == 24


@pytest.mark.parametrize("flags,needle", [
    (["--seed", "-1"], "split.seed"),
    (["--split", "temporal_global", "--cutoff", "99999999999999"], "split.cutoff"),
    (["--set", "split.test_fraction=.nan"], "split.test_fraction"),
    # one column in two roles: a KeyError traceback ("exists 2 times in schema") when read
    (["--user-col", "item_id"], "columns.item: 'item_id' is already the user column"),
    (["--event-col", "timestamp", "--keep-events", "a"], "columns.event: 'timestamp' is already the timestamp"),
])
def test_bad_ingest_config_values_are_refused_before_reading(tmp_path, capsys, flags, needle):
    missing = tmp_path / "no-such-log.parquet"  # a config error comes first: the source is never opened
    refused(capsys, tmp_path, ["ingest", str(missing), str(tmp_path / "out"), "--no-progress", *flags], needle)


def test_splits_that_leave_no_training_rows_are_refused(tmp_path, capsys):
    all_test = write_log(tmp_path / "l.parquet", log(split=["test"] * 24))
    refused(capsys, tmp_path, ["ingest", all_test, str(tmp_path / "out"), "--split", "column", "--split-col", "split",
                               "--no-progress"], "l.parquet", "no training data", "'train'")
    late = write_log(tmp_path / "t.parquet", log())
    refused(capsys, tmp_path, ["ingest", late, str(tmp_path / "out"), "--split", "temporal_global",
                               "--cutoff", "2000-01-01", "--no-progress"], "no training data", "2000-01-01")


def test_lightgcn_train_txt_without_rows_is_refused(tmp_path, capsys):
    folder = tmp_path / "lgcn"
    folder.mkdir()
    (folder / "train.txt").write_text("0\n1\n")
    (folder / "test.txt").write_text("0 1 2\n1 2\n")
    refused(capsys, tmp_path, ["ingest", str(folder), str(tmp_path / "out"), "--format", "lightgcn",
                               "--no-progress"], "train.txt leaves no training data")


def test_lightgcn_source_that_is_not_a_folder_of_text_files(tmp_path, capsys):
    """A Parquet file given with --format lightgcn, and a train.txt that is a directory: used to be
    NotADirectoryError / IsADirectoryError tracebacks."""
    src = write_log(tmp_path / "log.parquet", log())
    refused(capsys, tmp_path, ["ingest", src, str(tmp_path / "out"), "--format", "lightgcn", "--no-progress"],
            "log.parquet/train.txt", "a LightGCN folder needs train.txt and test.txt")
    folder = tmp_path / "lgcn"
    (folder / "train.txt").mkdir(parents=True)
    (folder / "test.txt").write_text("0 1\n")
    refused(capsys, tmp_path, ["ingest", str(folder), str(tmp_path / "out"), "--format", "lightgcn",
                               "--no-progress"], "train.txt: a directory, not a LightGCN text file")


@pytest.mark.parametrize("line,needle", [
    ("0 1 \u0662\n", "not an integer id"),  # an Arabic-Indic digit: int() would take it
    ("0 1 99999999999999999999\n", "above the int64 range"),
    ("0 1 x7\n", "not an integer id"),
])
def test_lightgcn_text_ids_are_checked(tmp_path, capsys, line, needle):
    folder = tmp_path / "lgcn"
    folder.mkdir()
    (folder / "train.txt").write_text("0 1 2\n" + line)
    (folder / "test.txt").write_text("0 3\n")
    refused(capsys, tmp_path, ["ingest", str(folder), str(tmp_path / "out"), "--format", "lightgcn",
                               "--no-progress"], "train.txt", "line 2", needle)


def test_corrupt_data_page_is_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 5000
    path = tmp_path / "log.parquet"
    table = pa.table({"user_id": [f"user-{rng.integers(1 << 40)}" for _ in range(n)],
                      "item_id": [f"item-{k % 97}" for k in range(n)], "timestamp": np.arange(n, dtype=np.int64)})
    pq.write_table(table, path, compression="zstd", use_dictionary=False)
    meta = pq.ParquetFile(path).metadata.row_group(0).column(0)
    raw = bytearray(path.read_bytes())
    middle = meta.data_page_offset + meta.total_compressed_size // 2
    raw[middle:middle + 64] = bytes(64)  # zero 64 bytes inside the user column's compressed page
    path.write_bytes(bytes(raw))
    refused(capsys, tmp_path, ["ingest", str(path), str(tmp_path / "out"), "--no-progress"],
            "log.parquet", "cannot read")


@pytest.mark.slow
def test_missing_ids_are_one_line_and_exit_2_every_time(tmp_path):
    """The real process, many times: the refusal of null / empty ids is one line and exit 2 on
    every run, never an abort at exit (status 134, a second line), which a second read of the
    file while its scan was open caused."""
    import subprocess
    import sys

    data = log()
    data["user_id"][3] = None
    nulls = write_log(tmp_path / "nulls.parquet", data)
    data = log()
    data["item_id"][5] = ""
    empty = write_log(tmp_path / "empty.parquet", data)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    before = tree(tmp_path)
    for run in range(24):
        src, needle = (nulls, "'user_id' has 1 null and 0 empty-string user ids (of 24 rows; first at row 3)") \
            if run % 2 == 0 else (empty, "'item_id' has 0 null and 1 empty-string item ids (of 24 rows; first at row 5)")
        # as the installed console script runs it (``python -m gnaq_dist.cli`` did not show the abort)
        proc = subprocess.run([sys.executable, "-c", "import sys; from gnaq_dist.cli import main; sys.exit(main())",
                               "ingest", src, str(tmp_path / "out"), "--no-progress"],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 2, (run, proc.returncode, proc.stderr)
        assert proc.stderr.count("\n") == 1 and needle in proc.stderr, (run, proc.stderr)
    assert tree(tmp_path) == before


def test_missing_ids_are_counted_over_the_whole_file_across_batches(tmp_path, capsys):
    data = log(n_users=10)
    data["user_id"][17] = None
    data["user_id"][30] = ""
    data["user_id"][31] = None
    src = write_log(tmp_path / "log.parquet", data)
    refused(capsys, tmp_path, ["ingest", src, str(tmp_path / "out"), "--no-progress", "--set", "batch_rows=4"],
            "log.parquet", "'user_id' has 2 null and 1 empty-string user ids (of 40 rows; first at row 17)")


def test_a_dataset_path_that_is_a_file_or_a_manifest_that_is_a_list(tmp_path, capsys):
    src = write_log(tmp_path / "log.parquet", log())
    afile = tmp_path / "notes.txt"
    afile.write_text("not a dataset")
    refused(capsys, tmp_path, ["ingest", src, str(afile), "--append", "--no-progress"], "not a gnaq dataset")
    ds = ingested(capsys, tmp_path)
    (ds / "manifest.json").write_text("[]")
    refused(capsys, tmp_path, ["ingest", src, str(ds), "--append", "--no-progress"], "a JSON list")


def _without(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


def _files(change):
    return lambda m: {**m, "files": change(dict(m["files"]))}


DATASET_MANIFESTS = {  # (change, needle); each used to be a traceback, or a file read from outside the folder
    "no n_users": (_without("n_users"), "n_users must be an integer >= 0, got None"),
    "n_users a string": (lambda m: {**m, "n_users": "many"}, "n_users must be an integer >= 0, got 'many'"),
    "no test file": (_files(lambda f: {k: v for k, v in f.items() if k != "test"}), "no entry for 'test'"),
    "a path out of the folder": (_files(lambda f: {**f, "train": {**f["train"], "path": "../elsewhere.parquet"}}),
                                 "'../elsewhere.parquet', is not a plain file name inside the dataset"),
    "an absolute path": (_files(lambda f: {**f, "train": {**f["train"], "path": "/etc/hostname"}}),
                         "'/etc/hostname', is not a plain file name"),
    "an entry without sha256": (_files(lambda f: {**f, "test": {"path": f["test"]["path"], "rows": 1}}),
                                "the entry of 'test' needs sha256"),
}


@pytest.mark.parametrize("case", sorted(DATASET_MANIFESTS))
def test_a_dataset_manifest_of_the_wrong_shape_is_one_line(tmp_path, capsys, case):
    change, needle = DATASET_MANIFESTS[case]
    src = write_log(tmp_path / "log.parquet", log())
    ds = ingested(capsys, tmp_path)
    manifest = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps(change(manifest)))
    refused(capsys, tmp_path, ["train", "--dataset", str(ds), "--out", str(tmp_path / "run"), "--epochs", "1",
                               "--set", "schedule.warmup_epochs=0", "--no-progress"], "manifest.json", needle)
    refused(capsys, tmp_path, ["ingest", src, str(ds), "--append", "--no-progress"], "manifest.json", needle)
    refused(capsys, tmp_path, ["partition", str(ds), str(tmp_path / "part"), "--workers", "2"], "manifest.json",
            needle)


# == item 5: train config values, validated before any data is read ================================


@pytest.mark.parametrize("override,needle", [
    ("optim.lr=.nan", "optim.lr"), ("optim.lr=-0.1", "optim.lr"), ("optim.lr=.inf", "optim.lr"),
    ("optim.quant_lr=.nan", "optim.quant_lr"), ("optim.quant_lr=0", "optim.quant_lr"),
    ("optim.l2=-1e-4", "optim.l2"), ("optim.l2=.nan", "optim.l2"),
    ("optim.grad_clip=.nan", "optim.grad_clip"), ("optim.grad_clip=0", "optim.grad_clip"),
    ("optim.grad_clip=-3", "optim.grad_clip"),
    ("threads=-2", "threads"), ("threads=0", "threads"), ("seed=-1", "seed"), ("seed=4294967296", "seed"),
    ("schedule.epochs=0", "schedule.epochs"), ("schedule.warmup_epochs=-1", "schedule.warmup_epochs"),
    ("schedule.warmup_epochs=41", "schedule.warmup_epochs"), ("schedule.max_minutes=.inf", "schedule.max_minutes"),
    ("schedule.max_minutes=.nan", "schedule.max_minutes"), ("schedule.eval_every=-1", "schedule.eval_every"),
    ("schedule.fanouts=[0,10,10]", "schedule.fanouts"),
])
def test_bad_train_config_values_are_refused_before_reading_data(tmp_path, capsys, override, needle):
    missing = tmp_path / "no-such-dataset"  # a config error comes first: the dataset is never opened
    refused(capsys, tmp_path, ["train", "--dataset", str(missing), "--out", str(tmp_path / "run"),
                               "--no-progress", "--set", override], needle)


def test_negative_seed_flag_is_refused(tmp_path, capsys):
    refused(capsys, tmp_path, ["train", "--dataset", str(tmp_path / "none"), "--out", str(tmp_path / "run"),
                               "--seed", "-5"], "seed: -5")


def test_eval_split_valid_on_a_dataset_without_one(tmp_path, capsys):
    from gnaq_dist.config import load_config
    from gnaq_dist.dataset import load_dataset, read_manifest
    from gnaq_dist.errors import GnaqInputError
    from gnaq_dist.train.config import TrainConfig

    ds = ingested(capsys, tmp_path)
    config = load_config(TrainConfig, [], [f"dataset={ds}", "eval.split=valid"])
    # from the manifest alone (no table read): what a driver checks before Ray starts
    with pytest.raises(GnaqInputError, match=r"eval.split='valid' but the dataset has no valid rows") as info:
        config.check_dataset(read_manifest(str(ds)))
    assert "\n" not in str(info.value)
    with pytest.raises(GnaqInputError, match="no validation split"):
        load_dataset(str(ds)).split("valid")
    # the one-process CLI: one line and exit 2 before any training step
    run = tmp_path / "run"
    capsys.readouterr()
    rc = main(["train", "--dataset", str(ds), "--out", str(run), "--epochs", "1", "--no-progress",
               "--set", "schedule.warmup_epochs=0", "--set", "eval.split=valid"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no valid rows" in err[0], err
    assert not [p for p in run.rglob("*") if p.is_file()]  # no metrics, no summary
    # with --workers: refused on the driver from the manifest, before Ray starts
    rc = main(["train", "--dataset", str(ds), "--out", str(tmp_path / "run2"), "--workers", "2", "--no-progress",
               "--set", "eval.split=valid"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no valid rows" in err[0], err
    # a dataset with a validation split passes the same check
    withvalid = ingested(capsys, tmp_path, "dsv", "--valid-fraction", "0.25")
    config.check_dataset(read_manifest(str(withvalid)))


def test_train_out_an_existing_file_is_refused_before_training(tmp_path, capsys):
    ds = ingested(capsys, tmp_path)
    out = tmp_path / "notes.txt"
    out.write_text("not a run directory")
    refused(capsys, tmp_path, ["train", "--dataset", str(ds), "--out", str(out), "--no-progress"],
            f"--out {out}", "is a file, not a directory")
