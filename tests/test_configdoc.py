"""docs/config.md documents every config key and is in step with the code."""

from pathlib import Path

from gnaq_dist.configdoc import render, rows
from gnaq_dist.ingest.config import IngestConfig
from gnaq_dist.train.config import TrainConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_every_key_has_a_meaning():
    for cls in (IngestConfig, TrainConfig):
        undocumented = [key for key, _tp, _default, doc in rows(cls) if not doc]
        assert undocumented == [], f"{cls.__name__}: add a trailing # comment to {undocumented}"


def test_docs_config_md_is_up_to_date():
    assert DOC.read_text() == render(), "regenerate: python -m gnaq_dist.configdoc > docs/config.md"
