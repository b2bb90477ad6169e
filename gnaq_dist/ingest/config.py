"""Ingest configuration: one strict dataclass tree (see ``gnaq_dist.config``).

Kept separate from the pipeline so the CLI, YAML files and library callers share one
schema; ``validate`` rejects contradictory settings before any file is opened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from gnaq_dist.errors import ConfigError

SPLIT_STRATEGIES = ("random", "temporal_global", "temporal_user", "column")


def _in_range(seconds: int, where: str) -> int:
    from gnaq_dist.ingest.edges import TS_MAX, TS_MIN

    if not TS_MIN <= seconds <= TS_MAX:
        raise ConfigError(f"{where}: {seconds} unix seconds is outside years 1..9999")
    return seconds


def _parse_cutoff(value: str | int, where: str) -> int:
    """ISO date/datetime string or int unix seconds -> int unix seconds (naive = UTC)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected an ISO date/datetime or unix seconds, got {value!r}")
    if isinstance(value, int):
        return _in_range(value, where)
    text = value.strip()
    if text.lstrip("-").isascii() and text.lstrip("-").isdigit():
        return _in_range(int(text), where)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an ISO date/datetime or unix seconds") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


@dataclass
class ColumnsConfig:
    user: str = "user_id"  # column of raw user ids (string or any-width integer, dictionary ok)
    item: str = "item_id"  # column of raw item ids (string or any-width integer, dictionary ok)
    timestamp: str | None = "timestamp"  # time column (timestamp/date/int unix s); absent in every file = no time
    weight: str | None = None  # numeric interaction weight, stored as float32; null = none
    event: str | None = None  # event-type column that keep_events filters on (may be a Hive partition key)
    split: str | None = None  # column holding train/test/valid labels (split.strategy = column)


@dataclass
class SplitConfig:
    strategy: Literal["random", "temporal_global", "temporal_user", "column"] = "random"  # how test/valid are chosen
    test_fraction: float = 0.2  # random / temporal_user: share of each user's interactions put in test
    valid_fraction: float = 0.0  # random / temporal_user: share put in validation; column and a LightGCN folder: share of each user's train rows held out as validation (0 = no valid split)
    test_last_n: int | None = None  # temporal_user: each user's last n interactions go to test (overrides fraction)
    valid_last_n: int | None = None  # temporal_user: the n interactions before the test ones go to valid
    cutoff: str | int | None = None  # temporal_global: rows at/after this time (ISO or unix s) are test
    valid_cutoff: str | int | None = None  # temporal_global: rows in [valid_cutoff, cutoff) are valid
    seed: int = 2026  # random: seed of the per-user shuffle (same seed + same input = same split)
    train_value: str = "train"  # column: label of training rows in the split column
    test_value: str = "test"  # column: label of test rows
    valid_value: str = "valid"  # column: label of validation rows

    def validate(self) -> None:
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"split.test_fraction: {self.test_fraction} is not in [0, 1)")
        if not 0.0 <= self.valid_fraction < 1.0 or self.test_fraction + self.valid_fraction >= 1.0:
            raise ConfigError("split.valid_fraction: must be >= 0 with test_fraction + valid_fraction < 1")
        for name in ("test_last_n", "valid_last_n"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"split.{name}: {value} must be >= 0")
        if self.cutoff is not None:
            _parse_cutoff(self.cutoff, "split.cutoff")
        if self.valid_cutoff is not None:
            if self.cutoff is None:
                raise ConfigError("split.valid_cutoff: needs split.cutoff")
            if _parse_cutoff(self.valid_cutoff, "split.valid_cutoff") >= _parse_cutoff(self.cutoff, "split.cutoff"):
                raise ConfigError("split.valid_cutoff: must be earlier than split.cutoff")
        if self.strategy == "temporal_global" and self.cutoff is None:
            raise ConfigError("split.cutoff: strategy temporal_global needs a cutoff (ISO date or unix seconds)")
        if self.seed < 0:
            raise ConfigError(f"split.seed: {self.seed} must be >= 0")
        if len({self.train_value, self.test_value, self.valid_value}) != 3:
            raise ConfigError("split.train_value/test_value/valid_value: must be three different labels")

    @property
    def cutoff_s(self) -> int | None:
        return None if self.cutoff is None else _parse_cutoff(self.cutoff, "split.cutoff")

    @property
    def valid_cutoff_s(self) -> int | None:
        return None if self.valid_cutoff is None else _parse_cutoff(self.valid_cutoff, "split.valid_cutoff")


@dataclass
class IngestConfig:
    format: Literal["parquet", "lightgcn"] = "parquet"  # parquet logs, or a LightGCN train.txt/test.txt folder
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)  # which source columns mean what
    keep_events: list[str] | None = None  # keep only rows whose event column is one of these (null = all)
    dedup: bool = True  # drop repeated (user, item) pairs, keeping the row with the latest timestamp
    kcore_users: int = 0  # iterative k-core: every kept user has >= this many interactions (0 = off)
    kcore_items: int = 0  # iterative k-core: every kept item has >= this many interactions (0 = off)
    split: SplitConfig = field(default_factory=SplitConfig)  # how interactions are split (parquet format)
    batch_rows: int = 1_000_000  # rows per streamed record batch (bounds memory per batch)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for SOURCE and OUT (e.g. endpoint_url)
    progress: bool = True  # show a tqdm bar (rows, rows/s) on stderr

    def validate(self) -> None:
        if self.kcore_users < 0 or self.kcore_items < 0:
            raise ConfigError("kcore_users / kcore_items: must be >= 0")
        if self.batch_rows < 1:
            raise ConfigError(f"batch_rows: {self.batch_rows} must be >= 1")
        roles: dict[str, str] = {}
        for role in ("user", "item", "timestamp", "weight", "event", "split"):
            name = getattr(self.columns, role)
            if name and name in roles:
                raise ConfigError(f"columns.{role}: {name!r} is already the {roles[name]} column (each role needs "
                                  f"its own column)")
            if name:
                roles[name] = role
        if self.keep_events is not None and not self.columns.event:
            raise ConfigError("keep_events: needs columns.event (the column to filter on)")
        if self.keep_events is not None and not self.keep_events:
            raise ConfigError("keep_events: an empty list would drop every row")
        if self.format == "parquet" and self.split.strategy == "column" and not self.columns.split:
            raise ConfigError("columns.split: split.strategy 'column' needs the name of the split column")
        if self.format == "parquet" and self.split.strategy.startswith("temporal") and not self.columns.timestamp:
            raise ConfigError(f"columns.timestamp: split.strategy {self.split.strategy!r} needs a timestamp column")


def redacted(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Config as plain data with storage option values hidden (manifests must not hold secrets)."""
    out = dict(config_dict)
    out["storage_options"] = {k: "***" for k in config_dict.get("storage_options", {})}
    return out
