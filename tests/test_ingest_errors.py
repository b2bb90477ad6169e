"""Bad input: GnaqInputError, a one-line message naming file/column/value, nothing written."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from conftest import write_log
from gnaq_dist.config import from_dict, load_config
from gnaq_dist.errors import ConfigError, GnaqInputError
from gnaq_dist.ingest import IngestConfig, ingest


def cfg(**kw) -> IngestConfig:
    kw.setdefault("progress", False)
    return from_dict(IngestConfig, kw)


def fails(src: str, out, config: IngestConfig | None = None, *needles: str, **kw) -> str:
    with pytest.raises(GnaqInputError) as info:
        ingest(str(src), str(out), config or cfg(), **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert not os.path.exists(out), "something was written"
    return msg


GOOD = {"user_id": ["a", "b"], "item_id": ["x", "y"], "timestamp": [1, 2]}


def test_path_not_found(tmp_path):
    fails(tmp_path / "nope.parquet", tmp_path / "out", None, "nope.parquet", "not found")


def test_path_not_found_memory(memfs):
    with pytest.raises(GnaqInputError, match="memory://nothing/here: path not found"):
        ingest("memory://nothing/here", "memory://out", cfg())
    assert memfs.find("/") == []


def test_not_parquet(tmp_path):
    write_log(tmp_path / "src" / "a.parquet", GOOD)
    (tmp_path / "src" / "b.parquet").write_text("user_id,item_id\na,x\n")
    fails(tmp_path / "src", tmp_path / "out", None, "b.parquet", "not a Parquet file")


def test_empty_dataset(tmp_path):
    src = write_log(tmp_path / "e.parquet", pa.table({"user_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string())}))
    fails(src, tmp_path / "out", None, "e.parquet", "empty dataset")


def test_empty_after_event_filter(tmp_path):
    src = write_log(tmp_path / "l.parquet", {**GOOD, "event": ["view", "view"]})
    fails(src, tmp_path / "out", cfg(columns={"event": "event"}, keep_events=["buy"]), "l.parquet", "'event'", "empty dataset")


@pytest.mark.parametrize("role", ["user", "item"])
def test_missing_id_column(tmp_path, role):
    src = write_log(tmp_path / "l.parquet", GOOD)
    fails(src, tmp_path / "out", cfg(columns={role: "who"}), "l.parquet", "'who'", f"missing {role} column")


def test_null_ids(tmp_path):
    write_log(tmp_path / "src" / "ok.parquet", GOOD)
    write_log(tmp_path / "src" / "bad.parquet", {"user_id": ["a", None, None, ""], "item_id": ["x"] * 4, "timestamp": [1] * 4})
    fails(tmp_path / "src", tmp_path / "out", cfg(batch_rows=1), "bad.parquet", "'user_id'", "2 null", "1 empty-string")


def test_empty_string_item_ids(tmp_path):
    src = write_log(tmp_path / "l.parquet", {"user_id": ["a", "b"], "item_id": ["", "y"], "timestamp": [1, 2]})
    fails(src, tmp_path / "out", None, "l.parquet", "'item_id'", "1 empty-string")


@pytest.mark.parametrize("values,typename", [([1.0, 2.0], "double"), ([[1], [2]], "list")])
def test_unsupported_id_types(tmp_path, values, typename):
    src = write_log(tmp_path / "l.parquet", {"user_id": values, "item_id": ["x", "y"]})
    fails(src, tmp_path / "out", cfg(columns={"timestamp": None}), "l.parquet", "'user_id'", typename, "unsupported type")


def test_string_and_int_ids_mixed_across_files(tmp_path):
    write_log(tmp_path / "src" / "a.parquet", GOOD)
    write_log(tmp_path / "src" / "b.parquet", {"user_id": [1, 2], "item_id": ["x", "y"], "timestamp": [1, 2]})
    fails(tmp_path / "src", tmp_path / "out", None, "b.parquet", "'user_id'", "int ids")


def test_string_timestamp(tmp_path):
    src = write_log(tmp_path / "l.parquet", {**GOOD, "timestamp": ["2026-01-01", "2026-01-02"]})
    fails(src, tmp_path / "out", None, "l.parquet", "'timestamp'", "string")


def test_split_leaves_no_test_data(tmp_path):
    src = write_log(tmp_path / "l.parquet", GOOD)  # every user has one interaction
    fails(src, tmp_path / "out", None, "l.parquet", "'random'", "no test data")
    fails(src, tmp_path / "out", cfg(split={"strategy": "temporal_global", "cutoff": "2030-01-01"}), "no test data", "2030-01-01")


def test_unknown_split_label(tmp_path):
    src = write_log(tmp_path / "l.parquet", {**GOOD, "split": ["train", "holdout"]})
    fails(src, tmp_path / "out", cfg(columns={"split": "split"}, split={"strategy": "column"}), "l.parquet", "'holdout'")


def test_unknown_config_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"config.split: unknown key 'strategyy'"):
        from_dict(IngestConfig, {"split": {"strategyy": "random"}})
    path = tmp_path / "c.yaml"
    path.write_text("colums:\n  user: u\n")
    with pytest.raises(GnaqInputError, match=r"c.yaml: unknown key 'colums'"):
        load_config(IngestConfig, [path])


def test_output_exists(tmp_path):
    src = write_log(tmp_path / "l.parquet", {"user_id": ["a", "a"], "item_id": ["x", "y"]})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GnaqInputError, match="out: output already exists"):
        ingest(src, str(out), cfg())
    assert os.listdir(out) == ["keep.txt"]


def test_append_needs_a_dataset(tmp_path):
    src = write_log(tmp_path / "l.parquet", {"user_id": ["a", "a"], "item_id": ["x", "y"]})
    fails(src, tmp_path / "out", None, "out", "no manifest.json", append=True)
