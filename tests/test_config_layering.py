"""configs/: per-dataset files layered on configs/base.yaml with a `base:` key, one demo config.

The layered files must load to exactly the configs the earlier self-contained files gave
(copies under tests/data/configs_before_base/), and `base:` errors are one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gnaq_dist.config import load_config, read_yaml, to_dict
from gnaq_dist.demo import DEMO_CONFIG
from gnaq_dist.errors import ConfigError
from gnaq_dist.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BEFORE = Path(__file__).resolve().parent / "data" / "configs_before_base"
DATASETS = ["amazon-book", "gowalla", "synthetic", "yelp2018"]
NEWER = ["lastfm"]  # written after the move to base.yaml: no earlier file to equal


def _load(*paths, overrides=()):
    return to_dict(load_config(TrainConfig, list(paths), list(overrides)))


def _leaves(data, prefix=""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_every_dataset_has_its_earlier_config():
    assert sorted(p.stem for p in BEFORE.glob("*.yaml")) == DATASETS
    assert {f"{name}.yaml" for name in DATASETS + NEWER} | {"base.yaml", "demo.yaml"} == {
        p.name for p in CONFIGS.glob("*.yaml")}


@pytest.mark.parametrize("name", DATASETS)
def test_layered_config_equals_the_earlier_file(name):
    new = _load(CONFIGS / f"{name}.yaml")
    assert new == _load(BEFORE / f"{name}.yaml")
    # Naming the base again (as older commands might) changes nothing.
    assert _load(CONFIGS / "base.yaml", CONFIGS / f"{name}.yaml") == new
    # --set still wins over the file and its base.
    assert _load(CONFIGS / f"{name}.yaml", overrides=["model.dim=32"])["model"]["dim"] == 32


@pytest.mark.parametrize("name", DATASETS + NEWER)
def test_dataset_file_holds_only_what_differs_from_base(name):
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert raw.pop("base") == "base.yaml"
    base = dict(_leaves(yaml.safe_load((CONFIGS / "base.yaml").read_text())))
    restated = [key for key, value in _leaves(raw) if key in base and base[key] == value]
    assert restated == []
    assert raw["dataset"] == f"data/{name}"


def test_one_demo_config():
    """configs/demo.yaml is only a pointer to the packaged demo config: they cannot drift."""
    raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    assert list(raw) == ["base"]
    assert (CONFIGS / raw["base"]).resolve() == DEMO_CONFIG.resolve()
    assert _load(CONFIGS / "demo.yaml") == _load(DEMO_CONFIG)
    assert "base" not in yaml.safe_load(DEMO_CONFIG.read_text())  # the package's file stands alone


def test_base_resolves_relative_to_the_file_and_chains(tmp_path, monkeypatch):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "root.yaml").write_text("model:\n  dim: 16\n  bits: 4\nschedule:\n  epochs: 7\n  warmup_epochs: 1\n")
    (tmp_path / "shared" / "mid.yaml").write_text("base: root.yaml\nmodel:\n  bits: 8\n")
    (tmp_path / "run.yaml").write_text("base: shared/mid.yaml\nschedule:\n  epochs: 9\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(TrainConfig, [tmp_path / "run.yaml"])
    assert (config.model.dim, config.model.bits, config.schedule.epochs) == (16, 8, 9)
    assert "base" not in read_yaml(tmp_path / "run.yaml")


def _one_line_error(path):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, [path])
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_base_is_a_one_line_error_naming_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: nowhere.yaml\n")
    message = _one_line_error(tmp_path / "a.yaml")
    assert message.startswith(f"{tmp_path / 'a.yaml'}:") and "nowhere.yaml" in message and "not found" in message


@pytest.mark.parametrize("value", ["3", "''", "[a.yaml]", "null"])
def test_base_that_is_not_a_path_is_refused(tmp_path, value):
    (tmp_path / "a.yaml").write_text(f"base: {value}\n")
    message = _one_line_error(tmp_path / "a.yaml")
    assert message.startswith(f"{tmp_path / 'a.yaml'}: base:")


def test_bad_yaml_in_a_base_names_the_base(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "a.yaml").write_text("base: bad.yaml\n")
    assert _one_line_error(tmp_path / "a.yaml").startswith(f"{tmp_path / 'bad.yaml'}: not valid YAML")


def test_base_cycles_are_refused(tmp_path):
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    assert "cycle" in _one_line_error(tmp_path / "self.yaml")
    (tmp_path / "a.yaml").write_text("base: sub/b.yaml\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\n")
    message = _one_line_error(tmp_path / "a.yaml")
    assert "cycle" in message and "a.yaml" in message and "b.yaml" in message
