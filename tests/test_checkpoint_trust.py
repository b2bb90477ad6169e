"""Checkpoints and bundles are read only through their manifest's entries; a resume's refusals
come from the driver before Ray starts (issue 28, item 4).

A real checkpoint is written once by ``gnaq train`` (one process) on a real ingested dataset;
each case copies it, tampers with it as a hostile or careless user would, and runs the real
``gnaq`` entry point: exit 2, one line naming the checkpoint, nothing written, and (with
``--workers``) no Ray started.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest

from gnaq_dist import checkpoint as ckpt
from gnaq_dist.cli import main
from conftest import write_log
from test_adversarial_inputs import bundle, ingested, log, ok, refused

TRAIN = ["--no-progress", "--method", "gnaq", "--bits", "2", "--epochs", "1", "--set", "schedule.warmup_epochs=0",
         "--set", "model.dim=8", "--set", "model.num_layers=1", "--set", "schedule.batch_size=64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(dataset, checkpoint) written by the real one-process trainer."""
    import _pytest.capture

    root = tmp_path_factory.mktemp("trained")

    class Quiet:  # ok()/ingested() read a capsys; this module-scoped one just discards
        def readouterr(self):
            return _pytest.capture.CaptureResult("", "")

    dataset = ingested(Quiet(), root)
    rc = main(["train", "--dataset", str(dataset), "--out", str(root / "run"), *TRAIN])
    assert rc == 0
    (checkpoint,) = sorted((root / "run" / "checkpoints").glob("ckpt-*"))
    return dataset, checkpoint


def copy(checkpoint: Path, root: Path) -> Path:
    target = root / "ck" / checkpoint.name
    shutil.copytree(checkpoint, target)
    return target


def edit_manifest(path: Path, change) -> None:
    mpath = path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    mpath.write_text(json.dumps(change(manifest)))


def with_files(files):
    def change(m):
        m["files"] = files(m["files"])
        return m
    return change


def set_key(key, value):
    def change(m):
        m[key] = value
        return m
    return change


# -- the manifest's shape and names ----------------------------------------------------------------
BAD_MANIFESTS = {
    "a JSON list": (lambda m: [m], "a JSON list, not a checkpoint manifest"),
    "no files": (lambda m: {k: v for k, v in m.items() if k != "files"}, "files must be an object"),
    "files a list": (set_key("files", ["shard-00000-of-00001.parquet"]), "files must be an object"),
    "another version": (set_key("version", 2), "not a gnaq-checkpoint v1 manifest"),
    "another world size": (set_key("world_size", 2), "a file of another world size than its world_size 2"),
    "world size not a number": (set_key("world_size", "two"), "world_size must be an integer"),
    "a shard not listed": (with_files(lambda f: {k: v for k, v in f.items() if not k.startswith("shard-")}),
                           "shard-00000-of-00001.parquet is not listed"),
    "a parent-directory name": (with_files(lambda f: {**f, "../outside.txt": f["dense.parquet"]}),
                                "'../outside.txt' is not a plain file name"),
    "an absolute name": (with_files(lambda f: {**f, "/etc/hostname": f["dense.parquet"]}),
                         "'/etc/hostname' is not a plain file name"),
    "a name of no checkpoint file": (with_files(lambda f: {**f, "notes.txt": f["dense.parquet"]}),
                                     "'notes.txt', which is no file of a checkpoint"),
    "an entry without sha256": (with_files(lambda f: {k: {"bytes": v["bytes"]} for k, v in f.items()}),
                                "needs bytes (an integer) and sha256"),
    "model not an object": (set_key("model", "gnaq"), "model must be an object"),
    "an unknown shard_method": (set_key("shard_method", "nosuch"), "shard_method must name a method"),
    # the shards hold gnaq's columns; used to be a KeyError traceback
    "the shard_method of another method (fp)": (set_key("shard_method", "fp"), "no column 'param.weight'"),
    "the shard_method of another method (lsq)": (set_key("shard_method", "lsq"), "no column 'param.latent'"),
    "a level dtype torch has not": (lambda m: {**m, "model": {**m["model"], "level_dtype": "nosuch"}},
                                    "model.level_dtype 'nosuch' is not one of"),
    "an unknown phi": (lambda m: {**m, "model": {**m["model"], "phi": "relu"}}, "model.phi 'relu' is not one of"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_manifest_of_the_wrong_shape_is_one_line_for_export_evaluate_and_resume(trained, tmp_path, capsys, case):
    dataset, checkpoint = trained
    change, needle = BAD_MANIFESTS[case]
    ck = copy(checkpoint, tmp_path)
    edit_manifest(ck, change)
    refused(capsys, tmp_path, ["export", str(ck), str(tmp_path / "bundle")], str(ck), needle)
    refused(capsys, tmp_path, ["evaluate", str(ck), "--dataset", str(dataset), "--no-progress"], needle)
    refused(capsys, tmp_path, ["train", "--dataset", str(dataset), "--out", str(tmp_path / "run"), *TRAIN,
                               "--set", f"checkpoint.resume={ck}"], needle)


def test_read_table_opens_only_listed_files_and_checks_them(trained, tmp_path):
    _, checkpoint = trained
    ck = copy(checkpoint, tmp_path)
    manifest = ckpt.verify(str(ck))
    (ck / "extra.parquet").write_bytes((ck / "dense.parquet").read_bytes())
    with pytest.raises(ckpt.CheckpointError, match="extra.parquet is not listed"):
        ckpt.read_table(str(ck), "extra.parquet", manifest=manifest)
    with pytest.raises(ckpt.CheckpointError, match="is not listed"):
        ckpt.read_table(str(ck), "../" + ck.name + "/dense.parquet", manifest=manifest)
    # a listed file swapped after verify (or never verified, as a non-zero rank reads): refused as it is read
    shutil.copy(ck / "partition.parquet", ck / "dense.parquet")
    with pytest.raises(ckpt.CheckpointError, match="dense.parquet: its size or sha256 does not match"):
        ckpt.read_table(str(ck), "dense.parquet", manifest=manifest)


def test_an_unlisted_shard_on_disk_is_never_loaded(trained, tmp_path, capsys):
    """The manifest says world 2 and lists one shard; a second shard file sits beside it."""
    dataset, checkpoint = trained
    ck = copy(checkpoint, tmp_path)
    (ck / "shard-00000-of-00001.parquet").rename(ck / "shard-00000-of-00002.parquet")
    (ck / "shard-00001-of-00002.parquet").write_bytes((ck / "shard-00000-of-00002.parquet").read_bytes())

    def change(m):
        entry = m["files"].pop("shard-00000-of-00001.parquet")
        m["files"].pop("residuals-00000-of-00001.parquet", None)
        m["files"]["shard-00000-of-00002.parquet"] = entry
        m["world_size"] = 2
        return m

    edit_manifest(ck, change)
    refused(capsys, tmp_path, ["export", str(ck), str(tmp_path / "bundle")],
            "world_size 2 but shard-00001-of-00002.parquet is not listed")


# -- resume refusals, on the driver ------------------------------------------------------------------
def flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("workers", [False, True], ids=["one-process", "workers"])
@pytest.mark.parametrize("case", ["corrupt", "other bit width", "other dataset", "same sizes, other split",
                                  "other world size"])
def test_every_resume_refusal_is_one_line_on_the_driver(trained, tmp_path, capsys, case, workers):
    """Refused before the dataset is trained on, and with --workers before Ray starts: exit 2,
    one line, no run files, no Ray."""
    dataset, checkpoint = trained
    ck = copy(checkpoint, tmp_path)
    flags, needle = [], ""
    if case == "corrupt":
        flip_a_byte(ck / "shard-00000-of-00001.parquet")
        needle = "shard-00000-of-00001.parquet: sha256 does not match"
    elif case == "other bit width":
        flags, needle = ["--bits", "4"], "model.bits is 2 in the checkpoint, 4 in this config"
    elif case == "other dataset":
        src = write_log(tmp_path / "bigger-log.parquet", log(n_users=9))
        dataset = tmp_path / "bigger"
        ok(capsys, ["ingest", src, str(dataset), "--no-progress"])
        needle = "written for another dataset (n_users 6"
    elif case == "same sizes, other split":
        src = write_log(tmp_path / "same-log.parquet", log())
        dataset = tmp_path / "reseeded"
        ok(capsys, ["ingest", src, str(dataset), "--no-progress", "--seed", "11"])
        needle = "written for another dataset (train_sha256"
    else:
        edit_manifest(ck, set_key("world_size", 3))
        needle = "another world size than its world_size 3"
    run = tmp_path / "run"
    argv = ["train", "--dataset", str(dataset), "--out", str(run), *TRAIN, *flags,
            "--set", f"checkpoint.resume={ck}"] + (["--workers", "2"] if workers else [])
    t0 = time.monotonic()
    refused(capsys, tmp_path, argv, str(ck), needle)
    assert time.monotonic() - t0 < 60
    assert not run.exists()
    if workers:
        import ray

        assert not ray.is_initialized()


def test_a_resume_that_verifies_still_runs(trained, tmp_path, capsys):
    dataset, checkpoint = trained
    ck = copy(checkpoint, tmp_path)
    out = ok(capsys, ["train", "--dataset", str(dataset), "--out", str(tmp_path / "run"), *TRAIN,
                      "--epochs", "2", "--set", f"checkpoint.resume={ck}"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from"]["uri"] == str(ck)
    assert "metrics" in out


# -- bundles ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry, needle", [
    (["codes.parquet"], "the entry of embeddings is a list"),
    ({"path": "../outside.parquet", "bytes": 1, "sha256": "0" * 64}, "bad file name '../outside.parquet'"),
    ({"path": "/etc/hostname", "bytes": 1, "sha256": "0" * 64}, "bad file name '/etc/hostname'"),
])
def test_bundle_entries_are_plain_names_inside_the_bundle(tmp_path, capsys, entry, needle):
    from gnaq_dist.bundle.layout import body_digest

    b = bundle(tmp_path)
    info = json.loads((b / "bundle.json").read_text())
    info["files"]["embeddings"] = entry
    info["bundle_sha256"] = body_digest(info)  # a consistent bundle.json: only the entry is wrong
    (b / "bundle.json").write_text(json.dumps(info))
    refused(capsys, tmp_path, ["recommend", str(b), "--user", "0"], needle)


def test_the_sha256_of_a_real_checkpoint_matches_its_manifest(trained):
    """The fixture is what the writer wrote: every case above starts from a valid checkpoint."""
    _, checkpoint = trained
    manifest = ckpt.verify(str(checkpoint))
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((checkpoint / name).read_bytes()).hexdigest() == entry["sha256"]
