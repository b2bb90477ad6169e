"""Where ``gnaq train`` writes, and what it leaves: a checkpoint from the in-process trainer
(periodic, final, at the end of a time budget, resumed), ``--out`` as an fsspec URI
(``memory://``, ``s3://`` on a real moto server), and a one-line exit 2 before any data
is read when the location cannot be written."""

from __future__ import annotations

import json

import fsspec
import pytest

from gnaq_dist.cli import main as gnaq_main
from gnaq_dist.config import from_dict
from gnaq_dist.synthetic_logs import LogSpec, generate_log

BUCKET = "runs"

# A few seconds a run: 200 users, 100 items, GNAQ 2-bit after one fp epoch.
SMALL = ["--no-progress", "--epochs", "3", "--set", "schedule.warmup_epochs=1", "--set", "schedule.batch_size=1024",
         "--set", "model.dim=8", "--set", "model.num_layers=2", "--set", "schedule.eval_every=0",
         "--set", "eval.ks=[10,20]", "--set", "optim.lr=0.02", "--set", "threads=1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from gnaq_dist.ingest import IngestConfig, ingest

    root = tmp_path_factory.mktemp("outputs")
    generate_log(root / "log", LogSpec(users=200, items=100, rows=3000, seed=3), progress=False)
    ingest(str(root / "log"), str(root / "ds"), from_dict(IngestConfig, {"progress": False}))
    return str(root / "ds")


def train(capsys, dataset: str, out: str, *extra: str) -> dict:
    """Run ``gnaq train``; the JSON it prints last (progress lines such as "time limit" come before)."""
    assert gnaq_main(["train", "--dataset", dataset, "--out", out, *SMALL, *extra]) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.splitlines()
    return json.loads("\n".join(lines[lines.index("{"):]))


def one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    assert gnaq_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gnaq train: error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def read_json(uri: str) -> dict:
    with fsspec.open(uri, "rb") as fh:
        return json.loads(fh.read())


def checkpoint_names(root: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(root)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


# -- the in-process trainer's checkpoints --------------------------------------------------------
def test_local_run_leaves_a_final_checkpoint_that_export_and_evaluate_read(tmp_path, dataset, capsys):
    """checkpoint.every_epochs 0 (the default): one checkpoint, at the end, in the distributed
    format (one shard of one rank); `gnaq evaluate` on it gives the run's final metrics."""
    out = tmp_path / "run"
    printed = train(capsys, dataset, str(out))
    summary = json.loads((out / "summary.json").read_text())
    uri = summary["checkpoint"]
    assert printed["checkpoint"] == uri == str(out / "checkpoints" / "ckpt-000000000006")  # 3 epochs x 2 steps
    assert checkpoint_names(str(out / "checkpoints")) == ["ckpt-000000000006"]
    manifest = json.loads((out / "checkpoints" / "ckpt-000000000006" / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["phase"] == "quantized" and manifest["shard_method"] == "gnaq"
    assert sorted(manifest["files"]) == ["dense.parquet", "partition.parquet", "residuals-00000-of-00001.parquet",
                                         "shard-00000-of-00001.parquet"]
    assert manifest["config"]["dataset"] == dataset and manifest["progress"]["positives"] > 0
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events == ["start", "epoch", "epoch", "epoch", "eval", "checkpoint", "end"]

    assert gnaq_main(["evaluate", uri, "--dataset", dataset, "--json", "--no-progress"]) == 0
    scored = json.loads(capsys.readouterr().out)
    for k in ("recall@10", "recall@20", "ndcg@20"):
        assert scored[k] == pytest.approx(summary["metrics"][k], rel=1e-9), k
    assert gnaq_main(["export", uri, str(tmp_path / "bundle")]) == 0
    assert "bytes/node" in capsys.readouterr().out
    assert (tmp_path / "bundle" / "bundle.json").exists()


def test_every_epochs_and_keep_last(tmp_path, dataset, capsys):
    out = tmp_path / "run"
    train(capsys, dataset, str(out), "--set", "checkpoint.every_epochs=1", "--set", "checkpoint.keep_last=2")
    assert checkpoint_names(str(out / "checkpoints")) == ["ckpt-000000000004", "ckpt-000000000006"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "checkpoint"] == [2, 4, 6]
    first = json.loads((out / "checkpoints" / "ckpt-000000000004" / "manifest.json").read_text())
    assert (first["epoch"], first["phase"]) == (2, "quantized")


def test_time_budget_inside_the_warm_up_leaves_a_quantized_checkpoint(tmp_path, dataset, capsys):
    """schedule.max_minutes ends a run that would take far longer: its checkpoint is of the
    quantized table (the run quantizes what it has), and exports."""
    out = tmp_path / "run"
    printed = train(capsys, dataset, str(out), "--epochs", "100000", "--set", "schedule.warmup_epochs=99999",
                    "--time-limit", "0.01")
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["phase_epochs"]["fp"] < 99999 and summary["phase_epochs"]["quantized"] == 0
    manifest = json.loads((out / "checkpoints" / printed["checkpoint"].rsplit("/", 1)[1] / "manifest.json")
                          .read_text())
    assert manifest["phase"] == "quantized" and manifest["shard_method"] == "gnaq"
    assert gnaq_main(["export", printed["checkpoint"], str(tmp_path / "bundle")]) == 0


def test_resumed_run_continues_exactly(tmp_path, dataset, capsys):
    """fp for 2 epochs with checkpoints, then the same --out with 4 epochs resumes from epoch 2
    (weights and Adam state) and ends where an uninterrupted 4-epoch run ends."""
    fp = ["--method", "fp", "--set", "checkpoint.every_epochs=1"]
    whole = train(capsys, dataset, str(tmp_path / "whole"), *fp, "--epochs", "4")
    train(capsys, dataset, str(tmp_path / "split"), *fp, "--epochs", "2")
    resumed = train(capsys, dataset, str(tmp_path / "split"), *fp, "--epochs", "4")
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["resumed_from"]["epoch"] == 2 and summary["resumed_from"]["step"] == 4
    assert summary["phase_epochs"]["fp"] == 2  # this invocation's epochs
    assert resumed["checkpoint"].endswith("ckpt-000000000008")
    for k in ("recall@20", "ndcg@20"):
        assert resumed["metrics"][k] == pytest.approx(whole["metrics"][k], rel=1e-6), k
    # the checkpoint's history runs through both invocations
    history = json.loads((tmp_path / "split" / "checkpoints" / "ckpt-000000000008" / "manifest.json")
                         .read_text())["history"]
    assert [r["step"] for r in history if r["event"] == "epoch"] == [2, 4, 6, 8]


# -- --out as a URI -------------------------------------------------------------------------------
def test_memory_uri_out(memfs, dataset, capsys):
    printed = train(capsys, dataset, "memory://runs/x")
    assert printed["checkpoint"] == "memory://runs/x/checkpoints/ckpt-000000000006"
    assert read_json("memory://runs/x/summary.json")["checkpoint"] == printed["checkpoint"]
    with fsspec.open("memory://runs/x/metrics.jsonl", "rt") as fh:
        assert [json.loads(line)["event"] for line in fh][-2:] == ["checkpoint", "end"]
    assert read_json(printed["checkpoint"] + "/manifest.json")["world_size"] == 1


def test_unknown_scheme_is_one_line_exit_2(tmp_path, dataset, capsys):
    one_line_error(capsys, ["train", "--dataset", dataset, "--out", "foo://x/run", *SMALL], "--out foo://x/run",
                   "foo")


def test_out_under_a_file_is_refused_before_training(tmp_path, dataset, capsys):
    (tmp_path / "f").write_text("x")
    one_line_error(capsys, ["train", "--dataset", dataset, "--out", str(tmp_path / "f" / "run"), *SMALL],
                   "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_memory_out_with_ray_workers_is_refused_before_ray_starts(memfs, dataset, capsys):
    one_line_error(capsys, ["train", "--dataset", dataset, "--out", "memory://runs/x", "--workers", "2", *SMALL],
                   "memory://", "Ray workers")
    assert not memfs.exists("runs/x")


def test_bad_out_is_checked_before_the_dataset_is_read(tmp_path, capsys):
    one_line_error(capsys, ["train", "--dataset", str(tmp_path / "missing"), "--out", "foo://x", *SMALL], "--out foo://x")


# -- s3:// on a real moto server ---------------------------------------------------------------
@pytest.fixture
def s3_env(moto_endpoint, monkeypatch, tmp_path):
    """AWS settings as a user has them (environment variables, no storage_options), pointing at
    moto; ``BUCKET`` exists. Yields an s3fs filesystem to look at the results."""
    import s3fs

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=moto_endpoint, skip_instance_cache=True)
    fs.makedirs(BUCKET, exist_ok=True)
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_out_gets_metrics_summary_and_a_checkpoint_that_exports(s3_env, dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the URI once became a local folder ./s3:/...
    out = f"s3://{BUCKET}/run-ok"
    printed = train(capsys, dataset, out)
    fs = s3_env
    fs.invalidate_cache()
    assert printed["checkpoint"] == f"{out}/checkpoints/ckpt-000000000006"
    listed = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/run-ok"))
    assert listed == ["checkpoints", "metrics.jsonl", "summary.json"]  # no write probe left behind
    summary = json.loads(fs.cat(f"{BUCKET}/run-ok/summary.json"))
    assert summary["checkpoint"] == printed["checkpoint"] and "recall@20" in summary["metrics"]
    events = [json.loads(line)["event"] for line in fs.cat(f"{BUCKET}/run-ok/metrics.jsonl").decode().splitlines()]
    assert events[0] == "start" and events[-2:] == ["checkpoint", "end"]
    assert sorted(fs.ls(f"{BUCKET}/run-ok/checkpoints/ckpt-000000000006", detail=False))[-1].endswith("shard-00000-of-00001.parquet")
    assert not (tmp_path / "s3:").exists()
    bundle = tmp_path / "bundle"
    assert gnaq_main(["export", printed["checkpoint"], str(bundle)]) == 0, capsys.readouterr().err
    assert (bundle / "bundle.json").exists()
    assert gnaq_main(["evaluate", printed["checkpoint"], "--dataset", dataset, "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["recall@20"] == pytest.approx(
        summary["metrics"]["recall@20"], rel=1e-9)


def test_s3_without_credentials_is_one_line_exit_2(s3_env, dataset, monkeypatch, capsys):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    out = f"s3://{BUCKET}/run-nocreds"
    one_line_error(capsys, ["train", "--dataset", dataset, "--out", out, *SMALL], f"--out {out}: cannot write there",
                   "redentials")
    s3_env.invalidate_cache()
    assert not s3_env.exists(f"{BUCKET}/run-nocreds")


def test_s3_missing_bucket_is_one_line_exit_2(s3_env, dataset, capsys):
    out = "s3://no-such-bucket/run"
    one_line_error(capsys, ["train", "--dataset", dataset, "--out", out, *SMALL], f"--out {out}: cannot write there",
                   "bucket")
    s3_env.invalidate_cache()
    assert not s3_env.exists("no-such-bucket")  # not created by the check


@pytest.mark.slow
def test_s3_out_with_ray_workers(s3_env, dataset, tmp_path, capsys, monkeypatch):
    """Two Ray workers write their checkpoint to S3, into Ray Train's run directory under the
    same --out (which Ray registers where it lies); metrics and summary land there too."""
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.chdir(tmp_path)
    out = f"s3://{BUCKET}/run-ray"
    printed = train(capsys, dataset, out, "--workers", "2", "--set", "distributed.partition=hash")
    fs = s3_env
    fs.invalidate_cache()
    assert printed["checkpoint"] == f"{out}/checkpoints/ckpt-000000000006"
    assert {p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/run-ray")} == {
        "checkpoints", "metrics.jsonl", "summary.json"}
    manifest = json.loads(fs.cat(f"{BUCKET}/run-ray/checkpoints/ckpt-000000000006/manifest.json"))
    assert manifest["world_size"] == 2
    assert not (tmp_path / "s3:").exists()
    assert gnaq_main(["export", printed["checkpoint"], str(tmp_path / "bundle")]) == 0


@pytest.mark.parametrize("method", ["gnaq", "lsq"])
def test_resume_in_the_quantized_phase(tmp_path, dataset, capsys, method):
    """Resumed from a quantized checkpoint (row Adam state; LSQ's dense step size and its Adam
    state too), the run ends where the uninterrupted one ends."""
    args = ["--method", method, "--bits", "2", "--set", "checkpoint.every_epochs=1"]
    whole = train(capsys, dataset, str(tmp_path / "whole"), *args, "--epochs", "4")
    train(capsys, dataset, str(tmp_path / "split"), *args, "--epochs", "2")
    resumed = train(capsys, dataset, str(tmp_path / "split"), *args, "--epochs", "4")
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["resumed_from"]["epoch"] == 2 and summary["phase_epochs"] == {"fp": 0, "quantized": 2}
    for k in ("recall@20", "ndcg@20"):
        assert resumed["metrics"][k] == pytest.approx(whole["metrics"][k], rel=1e-6), k
