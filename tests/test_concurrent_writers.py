"""Two real ``gnaq ingest`` processes on one dataset cannot lose each other's work (issue 28, item 1).

The race is made certain, not hoped for: writer B is started first and frozen (SIGSTOP)
once it has read the dataset and begun writing (its staging folder, or on S3 its first
object, appears); writer A then runs to completion; B is resumed (SIGCONT) and must fail
at its commit: exit 2, one line, and nothing of B left at OUT. A's rows are all there.
A second test starts both at once, unfrozen, several times: whatever the interleaving,
every writer that exits 0 has all its rows in the final dataset.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import write_log
from gnaq_dist.dataset import load_dataset, read_manifest
from test_adversarial_inputs import tree

ROOT = Path(__file__).resolve().parent.parent


def big_log(path: Path | str, prefix: str, n_users: int, per: int = 8, **write_options) -> str:
    """A log whose users are all new (``prefix``): an append adds exactly its rows."""
    import numpy as np

    n = n_users * per
    k = np.arange(n)
    table = pa.table({"user_id": pa.array([f"{prefix}{u}" for u in k // per]),
                      "item_id": pa.array([f"i{v}" for v in (k * 7919) % 5000]),
                      "timestamp": pa.array(1_700_000_000 + k, pa.int64())})
    return write_log(path, table, **write_options)


def gnaq(*args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "gnaq_dist.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def freeze_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGSTOP ``proc`` as soon as ``ready()`` holds (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"writer B ended before it could be frozen: {proc.communicate()}"
        assert time.monotonic() < deadline, "writer B never reached its write"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGSTOP)


def n_rows(uri: str, storage_options: dict | None = None) -> int:
    return int(read_manifest(uri, storage_options)["n_interactions"])


def staging_of(out: Path):
    return lambda: any(p.name.startswith(f".{out.name}.staging-") for p in out.parent.iterdir())


def assert_lost_race(code: int, err: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "another writer committed" in lines[0] and "nothing was written" in lines[0], lines[0]


@pytest.mark.parametrize("first", ["append", "new OUT"])
def test_local_loser_fails_in_one_line_and_changes_nothing(tmp_path, first):
    out = tmp_path / "ds"
    flags = ["--no-progress"]
    if first == "append":
        base = big_log(tmp_path / "base.parquet", "base", 200)
        subprocess.run([sys.executable, "-m", "gnaq_dist.cli", "ingest", base, str(out), *flags], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
        mode = ["--append"]
    else:
        mode = []
    before = n_rows(str(out)) if out.exists() else 0
    slow = big_log(tmp_path / "b.parquet", "b", 60_000)
    fast = big_log(tmp_path / "a.parquet", "a", 300)
    b = gnaq("ingest", slow, str(out), *flags, *mode)
    try:
        freeze_when(b, staging_of(out))
        code_a, _, err_a = finish(gnaq("ingest", fast, str(out), *flags, *mode))
        assert code_a == 0, err_a
        after_a = {k: v for k, v in tree(tmp_path).items() if ".staging-" not in k}  # but B's own folder
    finally:
        os.kill(b.pid, signal.SIGCONT)
    code_b, out_b, err_b = finish(b)
    assert_lost_race(code_b, err_b)
    assert out_b == ""
    assert tree(tmp_path) == after_a  # B's staging folder is gone, A's dataset untouched
    manifest = read_manifest(str(out))
    assert manifest["version"] == (2 if first == "append" else 1)
    assert n_rows(str(out)) == before + 300 * 8
    assert load_dataset(str(out)).n_users == (200 if first == "append" else 0) + 300


@pytest.mark.slow
def test_simultaneous_appends_never_lose_rows(tmp_path):
    """Both start together, five times over: a writer that exits 0 has its rows in the dataset."""
    out = tmp_path / "ds"
    flags = ["--no-progress"]
    base = big_log(tmp_path / "base.parquet", "base", 100)
    subprocess.run([sys.executable, "-m", "gnaq_dist.cli", "ingest", base, str(out), *flags], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    expected = 100 * 8
    losers = 0
    for round_ in range(5):
        logs = [big_log(tmp_path / f"r{round_}-{w}.parquet", f"r{round_}w{w}-", 2_000) for w in range(2)]
        procs = [gnaq("ingest", log, str(out), *flags, "--append") for log in logs]
        for proc in procs:
            code, _, err = finish(proc)
            if code == 0:
                expected += 2_000 * 8
            else:
                assert_lost_race(code, err)
                losers += 1
        assert n_rows(str(out)) == expected  # no lost update, whoever won
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def test_an_append_whose_dataset_is_replaced_while_it_reads_loses_the_race(tmp_path, monkeypatch):
    """Writer B reads the manifest; A's append commits (and removes the version B was reading)
    before B reads the files: B fails as a lost race (one line, nothing written), not as a
    damaged dataset."""
    from gnaq_dist import dataset as dataset_module
    from gnaq_dist.concurrency import ConcurrentWriteError
    from gnaq_dist.errors import GnaqInputError
    from gnaq_dist.ingest import IngestConfig, ingest
    from gnaq_dist.storage import join

    out = str(tmp_path / "ds")
    ingest(big_log(tmp_path / "base.parquet", "base", 100), out, IngestConfig(progress=False))
    a_log = big_log(tmp_path / "a.parquet", "a", 50)
    real_read_tables = dataset_module.read_tables

    def read_while_a_commits(uri, storage_options=None, verify=True, names=None):
        stale = read_manifest(uri, storage_options)
        monkeypatch.setattr(dataset_module, "read_tables", real_read_tables)  # A reads as usual
        ingest(a_log, out, IngestConfig(progress=False), append=True)
        first = join(uri, next(iter(stale["files"].values()))["path"])
        assert not Path(first).exists()  # A's commit removed the version B read
        raise GnaqInputError(f"{first}: file listed in the manifest is missing")  # what B's read then meets

    monkeypatch.setattr(dataset_module, "read_tables", read_while_a_commits)
    with pytest.raises(ConcurrentWriteError, match="another writer committed it while this one read it"):
        ingest(big_log(tmp_path / "b.parquet", "b", 50), out, IngestConfig(progress=False), append=True)
    assert n_rows(out) == (100 + 50) * 8 and read_manifest(out)["version"] == 2  # A's rows, none of B's


def test_an_append_to_a_damaged_dataset_is_refused_as_damaged(tmp_path):
    from gnaq_dist.errors import GnaqInputError
    from gnaq_dist.ingest import IngestConfig, ingest

    out = tmp_path / "ds"
    ingest(big_log(tmp_path / "base.parquet", "base", 100), str(out), IngestConfig(progress=False))
    victim = out / next(iter(read_manifest(str(out))["files"].values()))["path"]
    victim.unlink()
    with pytest.raises(GnaqInputError, match="file listed in the manifest is missing"):
        ingest(big_log(tmp_path / "b.parquet", "b", 50), str(out), IngestConfig(progress=False), append=True)


# -- S3: conditional writes on a real moto server ---------------------------------------------------
@pytest.fixture
def s3(moto_endpoint):
    import s3fs

    opts = {"key": "testing", "secret": "testing", "endpoint_url": moto_endpoint, "skip_instance_cache": True}
    fs = s3fs.S3FileSystem(**opts)
    bucket = f"race-{time.monotonic_ns()}"
    fs.mkdir(bucket)
    return fs, bucket, opts


def test_s3_marks_are_written_with_conditional_puts(s3):
    """The store itself refuses the loser: If-None-Match on a new mark, If-Match on a replaced one."""
    from gnaq_dist.concurrency import ConcurrentWriteError, put_mark, remote_mark

    fs, bucket, _ = s3
    path = f"{bucket}/out/manifest.json"
    put_mark(fs, path, b'{"version": 1}', None, None)
    with pytest.raises(ConcurrentWriteError):
        put_mark(fs, path, b'{"version": 1, "other": true}', None, None)  # "create" when one exists
    seen, etag = remote_mark(fs, path)
    assert seen == b'{"version": 1}' and etag
    put_mark(fs, path, b'{"version": 2}', seen, etag)
    with pytest.raises(ConcurrentWriteError):
        put_mark(fs, path, b'{"version": 2, "lost": true}', seen, etag)  # the ETag seen is no longer current
    fs.invalidate_cache()
    assert fs.cat_file(path) == b'{"version": 2}'
    # the refusal is the server's (HTTP 412 to a stale If-Match), not only our re-read
    with pytest.raises(OSError):
        fs.pipe_file(path, b"stale", IfMatch=etag)
    fs.invalidate_cache()
    assert fs.cat_file(path) == b'{"version": 2}'


@pytest.mark.slow
@pytest.mark.parametrize("first", ["append", "new OUT"])
def test_s3_loser_fails_in_one_line_and_changes_nothing(s3, tmp_path, first):
    fs, bucket, opts = s3
    out = f"s3://{bucket}/ds"
    options = [f"--storage-option={k}={v}" for k, v in opts.items() if k != "skip_instance_cache"]
    flags = ["--no-progress", *options]
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    if first == "append":
        base = big_log(tmp_path / "base.parquet", "base", 200)
        code, _, err = finish(gnaq("ingest", base, out, *flags, env=env))
        assert code == 0, err
        mode = ["--append"]
    else:
        mode = []

    def keys() -> set[str]:
        fs.invalidate_cache()
        try:
            return set(fs.find(f"{bucket}/ds"))
        except FileNotFoundError:
            return set()

    start = keys()
    # many row groups: B's first object lands well before its last, and its mark
    slow = big_log(tmp_path / "b.parquet", "b", 60_000, row_group_size=2_000)
    fast = big_log(tmp_path / "a.parquet", "a", 300)
    b = gnaq("ingest", slow, out, *flags, *mode, env=env)
    try:
        freeze_when(b, lambda: bool(keys() - start))
        of_b = keys() - start  # B's objects so far (its attempt's token in their names)
        assert of_b and not any(k.endswith("manifest.json") for k in of_b)
        code_a, _, err_a = finish(gnaq("ingest", fast, out, *flags, *mode, env=env))
        after_a = {k: fs.cat_file(k) for k in keys() - of_b}
    finally:
        os.kill(b.pid, signal.SIGCONT)
    code_b, _, err_b = finish(b)
    storage = dict(opts)
    if first == "new OUT":
        # B's objects already make OUT exist: A is refused before writing, and B completes
        assert code_a == 2 and "already exists" in err_a and len(err_a.strip().splitlines()) == 1, err_a
        assert code_b == 0, err_b
        assert n_rows(out, storage) == 60_000 * 8
        return
    assert code_a == 0, err_a
    assert_lost_race(code_b, err_b)
    assert {k: fs.cat_file(k) for k in keys()} == after_a  # B's objects removed, A's dataset untouched
    assert read_manifest(out, storage)["version"] == (2 if first == "append" else 1)
    assert n_rows(out, storage) == (200 * 8 if first == "append" else 0) + 300 * 8
