"""SIGTERM and SIGINT sent to real ``gnaq`` processes (issue 28, item 3).

Each case starts the real command as a subprocess, waits until it is demonstrably in the
middle of its work (its staging folder exists, its metrics log has a line, its Ray
workers run), sends the signal and checks: exit 143 (SIGTERM) or 130 (SIGINT), one line
on stderr, no staging folder or temporary file left, the output absent or as it was;
for ``--workers`` also that no process the driver started outlives it, SIGKILL included.
A writer killed with SIGKILL leaves its staging folder; the next writer to that output
removes it, and never a live writer's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_adversarial_inputs import tree
from test_concurrent_writers import ROOT, big_log, finish, freeze_when, gnaq, staging_of

CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")]


def interrupted(code: int, err: str, sig: int) -> None:
    lines = err.strip().splitlines()
    assert code == CODES[sig], err
    assert len(lines) == 1, err
    assert f"interrupted by {signal.Signals(sig).name}" in lines[0], lines[0]


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".staging-" in p.name or ".tmp-" in p.name or ".old-" in p.name]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"never reached {what}"
        time.sleep(0.05)


# -- ingest -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, append", [
    pytest.param(signal.SIGTERM, False, id="SIGTERM-new"),
    pytest.param(signal.SIGINT, True, id="SIGINT-append"),
    pytest.param(signal.SIGINT, False, id="SIGINT-new", marks=pytest.mark.slow),
    pytest.param(signal.SIGTERM, True, id="SIGTERM-append", marks=pytest.mark.slow),
])
def test_ingest_interrupted_mid_write_removes_its_staging(tmp_path, sig, append):
    """Frozen with its staging folder half full, signalled, resumed: the folder goes, OUT is as it was."""
    out = tmp_path / "ds"
    if append:
        base = big_log(tmp_path / "base.parquet", "base", 200)
        subprocess.run([sys.executable, "-m", "gnaq_dist.cli", "ingest", base, str(out), "--no-progress"],
                       check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    src = big_log(tmp_path / "big.parquet", "b", 60_000)
    before = tree(tmp_path)
    proc = gnaq("ingest", src, str(out), "--no-progress", *(["--append"] if append else []))
    freeze_when(proc, staging_of(out))
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    code, stdout, err = finish(proc)
    interrupted(code, err, sig)
    assert stdout == ""
    assert tree(tmp_path) == before  # no staging folder, the dataset (or its absence) as it was


@pytest.mark.slow
def test_python_m_ingest_cli_handles_sigterm_too(tmp_path):
    out = tmp_path / "ds"
    src = big_log(tmp_path / "big.parquet", "b", 60_000)
    proc = subprocess.Popen([sys.executable, "-m", "gnaq_dist.ingest.cli", src, str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    freeze_when(proc, staging_of(out))
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    code, _, err = finish(proc)
    interrupted(code, err, signal.SIGTERM)
    assert not out.exists() and not leftovers(tmp_path)


def test_sigkill_leaves_staging_that_the_next_run_removes_but_never_a_live_writers(tmp_path, monkeypatch):
    import gnaq_dist.staging as staging

    out = tmp_path / "ds"
    src = big_log(tmp_path / "big.parquet", "b", 60_000)
    # a writer killed outright: nothing of it runs, its staging folder stays
    dead = gnaq("ingest", src, str(out), "--no-progress")
    freeze_when(dead, staging_of(out))
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    (stale,) = [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    # a live writer, frozen mid-write: its staging folder holds its lock
    live = gnaq("ingest", src, str(tmp_path / "other"), "--no-progress")
    freeze_when(live, staging_of(tmp_path / "other"))
    try:
        (alive,) = [p for p in tmp_path.iterdir() if p.name.startswith(".other.staging-")]
        monkeypatch.setattr(staging, "MIN_AGE_S", 0.0)  # both are seconds old; age is not what decides
        removed = staging.remove_stale(str(tmp_path), "ds") + staging.remove_stale(str(tmp_path), "other")
        assert removed == [str(stale)]
        assert not stale.exists() and alive.exists()
    finally:
        os.kill(live.pid, signal.SIGCONT)
    code, _, err = finish(live)
    assert code == 0, err
    # and the next ingest to OUT removes a dead writer's folder by itself
    dead = gnaq("ingest", src, str(out), "--no-progress")
    freeze_when(dead, staging_of(out))
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    (stale,) = [p for p in tmp_path.iterdir() if p.name.startswith(".ds.staging-")]
    old = time.time() - 3600
    os.utime(stale, (old, old))  # older than MIN_AGE_S, as a real leftover is
    code, _, err = finish(gnaq("ingest", src, str(out), "--no-progress"))
    assert code == 0, err
    assert not leftovers(tmp_path)


def test_a_dead_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """``atomic_path`` (checkpoint files, summary.json, recommend --output): the same proof by lock."""
    from gnaq_dist.storage import atomic_path

    target = tmp_path / "summary.json"
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from gnaq_dist.storage import atomic_path\n"
            "with atomic_path(%r) as tmp:\n"
            "    open(tmp, 'w').write('half'); print('ready', flush=True); time.sleep(600)\n") % (str(ROOT), str(target))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    (tmp,) = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    old = time.time() - 3600
    os.utime(tmp, (old, old))
    with atomic_path(target) as mine:  # the writer is alive: its file stays
        Path(mine).write_text("{}")
    assert tmp.exists()
    proc.kill()
    proc.wait()
    with atomic_path(target) as mine:  # now it is dead: its file goes
        Path(mine).write_text("{}")
    assert not tmp.exists() and target.read_text() == "{}"


# -- export -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lastfm_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-signal")
    from gnaq_dist.demo import ingest_bundled

    dataset = ingest_bundled(root / "lastfm", progress=False)
    code = subprocess.run([sys.executable, "-m", "gnaq_dist.cli", "train", "--dataset", dataset, "--out",
                           str(root / "run"), "--no-progress", "--method", "fp", "--epochs", "1", "--set", "schedule.warmup_epochs=0",
                           "--set", "model.dim=64", "--set", "model.num_layers=1"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    (checkpoint,) = sorted((root / "run" / "checkpoints").glob("ckpt-*"))
    return checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS)
def test_export_interrupted_while_writing_leaves_no_bundle(tmp_path, lastfm_checkpoint, sig):
    """Signalled the moment its staging folder appears (retried if it finished first)."""
    out = tmp_path / "bundle"
    for _ in range(8):
        proc = gnaq("export", str(lastfm_checkpoint), str(out))
        seen = staging_of(out)
        while proc.poll() is None and not seen():
            time.sleep(0.001)
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        code, _, err = finish(proc)
        if code == 0:  # it finished before the signal could land: again
            shutil.rmtree(out)
            continue
        interrupted(code, err, sig)
        assert not out.exists() and not leftovers(tmp_path)
        return
    pytest.fail("export always finished before the signal landed")


# -- train, one process -----------------------------------------------------------------------------
def tiny_dataset(root: Path) -> Path:
    src = big_log(root / "log.parquet", "u", 60, per=6)
    out = root / "ds"
    subprocess.run([sys.executable, "-m", "gnaq_dist.cli", "ingest", src, str(out), "--no-progress"], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    return out


LONG_RUN = ["--no-progress", "--epochs", "100000", "--set", "schedule.warmup_epochs=1", "--set", "model.dim=8",
            "--set", "checkpoint.every_epochs=1", "--set", "checkpoint.keep_last=2"]


def metrics_lines(run: Path, n: int):
    def ready() -> bool:
        path = run / "metrics.jsonl"
        return path.exists() and len(path.read_text().splitlines()) >= n
    return ready


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS)
def test_train_one_process_interrupted_is_one_line_and_keeps_complete_checkpoints(tmp_path, sig):
    dataset = tiny_dataset(tmp_path)
    run = tmp_path / "run"
    proc = gnaq("train", "--dataset", str(dataset), "--out", str(run), *LONG_RUN)
    wait_for(lambda: len(list((run / "checkpoints").glob("ckpt-*/manifest.json"))) >= 2 if run.exists() else False,
             proc, what="two checkpoints")
    os.kill(proc.pid, sig)
    code, _, err = finish(proc)
    interrupted(code, err, sig)
    assert not leftovers(tmp_path)
    from gnaq_dist.checkpoint import CheckpointStore

    assert CheckpointStore(str(run / "checkpoints")).latest() is not None  # the newest complete one verifies


# -- train --workers: Ray ---------------------------------------------------------------------------
def descendants(pid: int) -> dict[int, int]:
    from gnaq_dist.distributed.ray_reaper import descendants as of

    return of(pid)


def alive(seen: dict[int, int]) -> list[int]:
    from gnaq_dist.distributed.ray_reaper import _alive

    return _alive(seen)


def ray_run(tmp_path: Path):
    dataset = tiny_dataset(tmp_path)
    ray_tmp = tempfile.mkdtemp(prefix="/tmp/gq")  # Ray's socket paths must stay short
    env = {"RAY_TMPDIR": ray_tmp}
    proc = gnaq("train", "--workers", "2", "--dataset", str(dataset), "--out", str(tmp_path / "run"),
                *LONG_RUN, "--set", "distributed.partition=hash", env=env)
    seen: dict[int, int] = {}

    def workers_train() -> bool:
        seen.update(descendants(proc.pid))
        return metrics_lines(tmp_path / "run", 0)() or any(
            "RayTrainWorker" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
            for p in list(seen) if Path(f"/proc/{p}/cmdline").exists())

    return proc, seen, workers_train, ray_tmp


def assert_all_gone(pids: set, within: float) -> None:
    """Every process of ``pids`` has ended within ``within`` seconds (else: their command lines)."""
    deadline = time.monotonic() + within
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alive(pids) == [], [Path(f"/proc/{p}/cmdline").read_text(errors="replace") for p in alive(pids)]

@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS)
def test_train_workers_interrupted_is_one_line_and_takes_its_ray_along(tmp_path, sig):
    proc, seen, workers_train, ray_tmp = ray_run(tmp_path)
    try:
        wait_for(workers_train, proc, timeout=300, what="Ray workers")
        time.sleep(2)
        seen.update(descendants(proc.pid))
        os.kill(proc.pid, sig)
        code, _, err = finish(proc, timeout=180)
        interrupted(code, err, sig)
        assert_all_gone(seen, within=30)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_a_sigkilled_driver_takes_its_local_ray_with_it(tmp_path):
    proc, seen, workers_train, ray_tmp = ray_run(tmp_path)
    try:
        wait_for(workers_train, proc, timeout=300, what="Ray workers")
        time.sleep(2)
        seen.update(descendants(proc.pid))
        assert len(seen) >= 5  # the watchdog, GCS, raylet, agents, workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert_all_gone(seen, within=60)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
