"""docs/quickstart.md, run as printed: logs in S3 (a moto server on 127.0.0.1) and a two-node
Ray cluster (cluster/local.sh on 127.0.0.1) -> ingested, trained on both nodes, checkpointed
to S3, scored, exported and served. The page's ```bash blocks are the script; only its
environment block (marked) is replaced by the test's own values."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "quickstart.md"
ENV_MARK = "<!-- quickstart: environment"
ENV_NAMES = {"BUCKET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_PORT", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}


def page_blocks(text: str) -> tuple[str, list[str]]:
    """(the environment block, the other ```bash blocks in order)."""
    env, blocks, body, previous, inside, marked = None, [], [], "", False, False
    for line in text.splitlines():
        if not inside and line.startswith("```bash"):
            inside, body, marked = True, [], previous.startswith(ENV_MARK)
        elif inside and line.startswith("```"):
            inside = False
            if marked:
                assert env is None, "two environment blocks"
                env = "\n".join(body)
            else:
                blocks.append("\n".join(body))
        elif inside:
            body.append(line)
        if line.strip():
            previous = line.strip()
    assert env is not None, f"{PAGE}: no block after {ENV_MARK}"
    return env, blocks


def test_the_page_has_its_steps_and_the_environment_block_sets_what_the_test_sets():
    env, blocks = page_blocks(PAGE.read_text())
    exported = set(re.findall(r"^export ((?:[A-Z_]+=\S*\s*)+)", env, re.M))
    names = {assignment.split("=")[0] for line in exported for assignment in line.split()}
    assert names == ENV_NAMES
    script = "\n".join(blocks)
    for step in ("cluster/local.sh start", "gnaq ingest s3://", "gnaq train --address", "gnaq evaluate s3://",
                 "gnaq export s3://", "gnaq recommend", "cluster/local.sh stop"):
        assert step in script, step


@pytest.mark.slow  # a two-node Ray cluster and a 30-epoch run: about 2 minutes on 2 cores
def test_the_quickstart_runs_as_printed(moto_endpoint, tmp_path):
    pytest.importorskip("ray")
    import s3fs

    cluster = load_script("cluster/local_cluster.py")
    _, blocks = page_blocks(PAGE.read_text())
    bucket = "quickstart"
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=moto_endpoint, skip_instance_cache=True)
    fs.makedirs(bucket, exist_ok=True)

    work = tmp_path / "work"
    work.mkdir()
    for name in ("cluster", "configs"):  # the page runs beside the repository's cluster/ and configs/
        (work / name).symlink_to(ROOT / name)
    bin_dir = tmp_path / "bin"  # `gnaq` and `python`: this interpreter, this checkout
    bin_dir.mkdir()
    for name, command in (("gnaq", f'exec "{sys.executable}" -m gnaq_dist.cli "$@"'),
                          ("python", f'exec "{sys.executable}" "$@"')):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{command}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    port = cluster.free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")}
    env.update({
        "PATH": os.pathsep.join([str(bin_dir), env.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        "PYTHON": sys.executable,  # for cluster/local.sh
        "BUCKET": bucket, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "RAY_PORT": str(port), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
    })
    script = "set -euo pipefail\n" + "".join(f"echo '### block {i}'\n{b}\n" for i, b in enumerate(blocks))
    (tmp_path / "quickstart.sh").write_text(script)
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    before = current.read_text() if current.exists() else None
    try:
        done = subprocess.run(["bash", str(tmp_path / "quickstart.sh")], cwd=work, env=env, capture_output=True,
                              text=True, timeout=1200)
    finally:
        temp_dir = cluster.default_temp_dir(port)
        cluster.stop(temp_dir=temp_dir)  # the page's own stop ran unless a step failed: this finds nothing then
        left = cluster.cluster_processes(temp_dir)
        if before is None:
            current.unlink(missing_ok=True)
        else:
            current.write_text(before)
    log = done.stdout[-6000:] + "\n--- stderr\n" + done.stderr[-6000:]
    assert done.returncode == 0, log
    assert left == [], f"processes of the quickstart's cluster left: {left}"
    parts = re.split(r"^### block (\d+)$", done.stdout, flags=re.M)
    out = {int(parts[i]): parts[i + 1] for i in range(1, len(parts), 2)}
    assert sorted(out) == list(range(len(blocks)))
    by_step = {next(s for s in ("local.sh start", "gnaq ingest", "gnaq train", "gnaq evaluate", "gnaq export",
                                "local.sh stop", "python -c") if s in b): out[i] for i, b in enumerate(blocks)}

    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/datasets/lastfm/manifest.json")
    summary = json.loads(fs.cat(f"{bucket}/runs/lastfm/summary.json"))
    checkpoint = f"s3://{bucket}/runs/lastfm/checkpoints/ckpt-000000000120"
    assert summary["checkpoint"] == checkpoint and summary["world_size"] == 2
    assert len(set(summary["worker_nodes"])) == 2  # one worker on each node
    assert checkpoint in by_step["gnaq train"]
    manifest = json.loads(fs.cat(f"{bucket}/runs/lastfm/checkpoints/ckpt-000000000120/manifest.json"))
    assert manifest["world_size"] == 2 and manifest["epoch"] == 30
    assert summary["metrics"]["recall@20"] > 0.2  # the demo's config on Last.fm reaches about 0.25
    assert f"20\t{summary['metrics']['recall@20']:.4f}\t" in by_step["gnaq evaluate"]  # what the run logged
    assert (work / "bundle" / "bundle.json").exists()
    lines = [line.split("\t") for line in by_step["gnaq export"].splitlines() if line.startswith("424\t")]
    assert [rank for _, rank, _, _ in lines] == ["1", "2", "3", "4", "5"]
    assert "address: 127.0.0.1:" in by_step["local.sh start"]
    assert re.search(r"stopped \d+ processes", by_step["local.sh stop"])
