"""The public Python API (gnaq_dist.api, docs/api.md): the documented examples run as printed,
and ``train`` on Ray Train with a user's ScalingConfig, RunConfig and callback reports every
epoch's metrics, lets the user's CheckpointConfig decide which checkpoints stay, and returns a
Result whose checkpoint loads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
API_DOC = ROOT / "docs" / "api.md"


def doc_examples() -> list[str]:
    """The ```python blocks of docs/api.md, in order."""
    return re.findall(r"```python\n(.*?)```", API_DOC.read_text(), flags=re.S)


def run_examples(blocks: list[str], cwd: Path) -> str:
    """Run ``blocks`` as one script in a fresh interpreter in ``cwd``; its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_the_package_exports_the_api_without_importing_torch():
    code = ("import sys, gnaq_dist; names = [n for n in gnaq_dist.__all__]; "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules; "
            "print(callable(gnaq_dist.train), callable(gnaq_dist.evaluate), callable(gnaq_dist.export), "
            "hasattr(gnaq_dist.Bundle, 'load'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True", "True"]


def test_the_in_process_examples_of_docs_api_run_as_printed(tmp_path):
    """Every example but the Ray one (tests below and the slow tier run that one)."""
    blocks = [b for b in doc_examples() if "ScalingConfig" not in b]
    assert len(blocks) == 5, "docs/api.md: ingest, load_dataset, train, evaluate, export examples"
    out = run_examples(blocks, tmp_path).splitlines()
    assert out[0].split()[:2] == ["1880", "4489"]  # the Last.fm sample's users and items
    recall, checkpoint = out[-3].split()  # (the trainer's own lines come before)
    assert 0.0 < float(recall) <= 1.0
    assert (Path(checkpoint) / "manifest.json").exists()
    assert float(out[-2].split()[0]) == pytest.approx(float(recall), abs=1e-6)  # evaluate scores it alike
    ratio, _bytes, items = out[-1].split(" ", 2)
    assert float(ratio) > 1 and len(eval(items)) == 5  # top-5 raw item ids from the bundle
    assert (tmp_path / "bundle" / "bundle.json").exists()


def test_a_config_may_be_a_dict_a_dataclass_or_a_yaml_path(tmp_path):
    from gnaq_dist.api import _as_config
    from gnaq_dist.errors import ConfigError
    from gnaq_dist.train.config import TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text("dataset: d\nmodel:\n  dim: 8\n")
    for given in ({"dataset": "d", "model": {"dim": 8}}, TrainConfig(dataset="d"), str(path), path):
        config = _as_config(TrainConfig, given, "train config")
        assert isinstance(config, TrainConfig) and config.dataset == "d"
    original = TrainConfig(dataset="d")
    assert _as_config(TrainConfig, original, "train config") is not original  # a run fills in the copy
    with pytest.raises(ConfigError, match="model: unknown key 'nope'"):
        _as_config(TrainConfig, {"model": {"nope": 1}}, "train config")
    with pytest.raises(ConfigError, match="expected a TrainConfig"):
        _as_config(TrainConfig, 3, "train config")


def test_train_refuses_a_config_without_dataset_before_anything_runs(tmp_path):
    import gnaq_dist
    from gnaq_dist.errors import GnaqInputError

    with pytest.raises(GnaqInputError, match="no dataset"):
        gnaq_dist.train({"out": str(tmp_path / "run")})
    assert not (tmp_path / "run").exists()


# -- on Ray Train --------------------------------------------------------------------------------

class RecordingCallback:
    """A user's Ray Train callback (it runs in Train's controller): each report's rank-0 metrics
    and checkpoint path, one JSON line each, to ``path``."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):  # noqa: ANN001 - Ray Train's signature
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"metrics": metrics[0], "checkpoint": checkpoint.path if checkpoint else None}) + "\n")

    def after_exception(self, run_context, worker_exceptions):  # noqa: ANN001
        pass


@pytest.mark.slow
def test_train_on_ray_with_a_users_scaling_config_and_callback(tmp_path):
    ray = pytest.importorskip("ray")
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig, UserCallback

    import gnaq_dist
    from gnaq_dist.demo import ingest_bundled

    class Recording(RecordingCallback, UserCallback):
        pass

    dataset = ingest_bundled(tmp_path / "lastfm", progress=False)
    seen = tmp_path / "reports.jsonl"
    epochs = 4
    config = {
        "dataset": dataset, "out": str(tmp_path / "run"), "progress": False,
        "model": {"method": "gnaq", "bits": 2, "dim": 16, "num_layers": 2},
        "schedule": {"epochs": epochs, "warmup_epochs": 2, "steps_per_epoch": 4, "batch_size": 2048,
                     "eval_every": 1, "propagation": "sampled", "fanouts": [5, 5]},
        "optim": {"lr": 0.01},
        "checkpoint": {"every_epochs": 1, "keep_last": 3},
        "distributed": {"partition": "hash", "grad_bits": 2},
    }
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable in Ray's actors
    result = gnaq_dist.train(
        config, scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="users-run", callbacks=[Recording(str(seen))],
                             checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="recall@20",
                                                                checkpoint_score_order="max")))
    reports = [json.loads(line) for line in seen.read_text().splitlines()]
    # one report an epoch, each with the epoch's loss, throughput, wire bytes, metrics and checkpoint
    assert [r["metrics"]["epoch"] for r in reports] == list(range(1, epochs + 1))
    for r in reports:
        m = r["metrics"]
        assert m["loss"] > 0 and m["positives_per_s"] > 0 and m["gradients_sent_bytes"] > 0 and m["bytes_per_step"] > 0, m
        assert 0 < m["recall@20"] <= 1 and 0 < m["ndcg@20"] <= 1, m
        assert r["checkpoint"] and Path(r["checkpoint"]).parent == tmp_path / "run" / "users-run"
    assert [r["metrics"]["quantized"] for r in reports] == [0, 0, 1, 1]
    assert result.metrics["recall@20"] == reports[-1]["metrics"]["recall@20"]
    # the user's CheckpointConfig alone decides what stays: the best by recall@20, and the latest
    best = max(reports, key=lambda r: r["metrics"]["recall@20"])["checkpoint"]
    kept = sorted(str(p.parent) for p in (tmp_path / "run" / "users-run").glob("ckpt-*/manifest.json"))
    assert kept == sorted({best, reports[-1]["checkpoint"]})
    assert Path(result.checkpoint.path) == Path(reports[-1]["checkpoint"])
    assert best in [str(c.path) for c, _ in result.best_checkpoints]  # Ray's ranking by the user's score
    # Result.checkpoint loads: scored as it is, and exported into a bundle that serves
    scores = gnaq_dist.evaluate(result.checkpoint, dataset)
    assert scores["recall@20"] == pytest.approx(result.metrics["recall@20"], abs=1e-6)
    gnaq_dist.export(result.checkpoint, str(tmp_path / "bundle"))
    bundle = gnaq_dist.Bundle.load(tmp_path / "bundle")
    items, _ = bundle.recommend([bundle.user_ids[0]], k=5)[0]
    assert len(items) == 5
    # the run's files at its out, as a gnaq train run leaves them
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "eval"] == list(range(1, epochs + 1))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]["recall@20"] == \
        result.metrics["recall@20"]


@pytest.mark.slow
def test_the_ray_example_of_docs_api_runs_as_printed(tmp_path):
    pytest.importorskip("ray")
    blocks = doc_examples()
    ray_block = next(b for b in blocks if "ScalingConfig" in b)
    out = run_examples(blocks[:1] + [ray_block], tmp_path).splitlines()
    epoch, recall, loss = out[-3].split()
    assert int(epoch) == 3 and 0 < float(recall) <= 1 and float(loss) > 0
    assert "/runs/ray/lastfm-gnaq/ckpt-" in out[-2]
    assert float(out[-1]) == pytest.approx(float(recall), abs=1e-6)
