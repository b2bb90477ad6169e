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


def test_config_help_carries_no_measurements_or_history():
    """Config help says what a key does; figures and dated history belong in docs/notes/."""
    import re

    history = re.compile(r"\b20\d\d-\d\d-\d\d\b|\((?:morning|day|late|night)\)|\bmeasured\b|\bissue \d+"
                         r"|\d(?:\.\d+)? ?(?:s|ms) an? (?:step|epoch|update)\b|\d(?:\.\d+)? ?-> ?\d")
    for cls in (IngestConfig, TrainConfig):
        for key, _tp, _default, doc in rows(cls):
            assert not history.search(doc), f"{key}: {doc}"
    assert not history.search(render())
