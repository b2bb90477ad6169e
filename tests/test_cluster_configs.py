"""The shipped configs: every training YAML loads and validates; the Ray cluster-launcher
YAML passes Ray's own schema; the KubeRay RayJob runs a `gnaq train` that parses, on a
cluster with the CPUs that the launcher's capacity check asks for."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from gnaq_dist.config import load_config
from gnaq_dist.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "gnaq_dist" / "configs").glob("*.yaml"))


def test_the_expected_configs_are_there():
    names = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert {"gowalla.yaml", "yelp2018.yaml", "amazon-book.yaml", "synthetic.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_training_config_loads_and_validates(path):
    config = load_config(TrainConfig, [path])
    config.validate()
    assert config.model.dim >= 1 and config.schedule.epochs >= 1


@pytest.mark.parametrize("name", ["gowalla", "yelp2018", "amazon-book", "synthetic"])
def test_benchmark_configs_use_the_paper_model(name):
    config = load_config(TrainConfig, [ROOT / "configs" / f"{name}.yaml"])
    assert (config.model.dim, config.model.num_layers) == (64, 3)
    assert config.dataset == f"data/{name}"


def test_ray_cluster_yaml_passes_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    if not schema_path.exists():
        pytest.skip(f"this Ray ({ray.__version__}) ships no {schema_path.name}")
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, json.loads(schema_path.read_text()))

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert any(t["resources"].get("CPU", 0) > 0 and "GPU" not in t["resources"] for t in workers.values())
    assert any(t["resources"].get("GPU", 0) > 0 and t.get("min_workers", 0) == 0 for t in workers.values())
    # The CPU wheel first, pinned like requirements/cpu.txt; then the project and this Ray.
    setup = "\n".join(config["setup_commands"])
    assert setup.index("requirements/cpu.txt") < setup.index("gnaq-dist[s3,cluster]")
    # The cluster extra brings the dashboard / job server at exactly this Ray's version.
    pins = (ROOT / "pyproject.toml").read_text()
    assert 'cluster = ["ray[default]>=2.60.0,<2.61"]' in pins and f"{ray.__version__}".startswith("2.60.")
    assert (ROOT / "requirements" / "cpu.txt").exists()
    assert "." in config["file_mounts"].values()


def _rayjob():
    docs = [d for d in yaml.safe_load_all((ROOT / "cluster" / "rayjob.yaml").read_text()) if d]
    (job,) = [d for d in docs if d.get("kind") == "RayJob"]
    return job, docs


def test_rayjob_runs_gnaq_train_with_two_workers():
    import ray

    from gnaq_dist.cli import _train_overrides, build_parser

    job, docs = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["gnaq", "train"]
    parser, _ = build_parser("train")
    args = parser.parse_args(argv[1:])
    assert args.workers == 2 and args.address == "auto"
    # The entrypoint's config (inside the image at /home/ray/gnaq-dist) is this repository's.
    configs = [ROOT / Path(c).relative_to("/home/ray/gnaq-dist") for c in args.config]
    config = load_config(TrainConfig, configs, _train_overrides(args))
    config.validate()
    assert config.distributed.grad_bits == 2 and config.checkpoint.every_epochs > 0

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    assert groups and all(g["replicas"] >= 1 for g in groups)
    # The launcher's capacity check: W workers x 1 CPU + 1 for the Train controller.
    cpus = int(head["rayStartParams"].get("num-cpus", 0)) + sum(
        g["replicas"] * int(g["rayStartParams"]["num-cpus"]) for g in groups)
    assert cpus >= args.workers + 1
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    images = {c["image"] for pod in pods for c in pod["containers"]}
    assert len(images) == 1  # head and workers run the same image (the same gnaq-dist and Ray)
    # Runs and checkpoints go to a volume every pod mounts, and the claim is defined.
    claims = {v["persistentVolumeClaim"]["claimName"] for pod in pods for v in pod["volumes"]}
    assert claims == {"gnaq-shared"}
    assert config.out.startswith("/mnt/shared/")
    assert any(d.get("kind") == "PersistentVolumeClaim" and d["metadata"]["name"] == "gnaq-shared" for d in docs)


def test_dockerfile_copies_what_exists_and_pins_this_ray():
    import ray

    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-py311" in text
    for line in text.splitlines():
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                if not src.startswith("--"):
                    assert (ROOT / src).exists(), src
