"""A bundle's layout: its files, their columns and the fields of ``bundle.json``.

One definition for the writer (:mod:`gnaq_dist.export`) and the reader
(:mod:`gnaq_dist.serving`); docs/export.md describes the columns' types.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

BUNDLE_JSON = "bundle.json"  # written last: the commit mark of a bundle directory
BUNDLE_FORMAT = "gnaq-bundle"
BUNDLE_VERSION = 1
KINDS = ("packed", "fp")  # packed codes + levels, or a float32 table
#: The embedding files of each kind, and the files every bundle has.
KIND_FILES: dict[str, tuple[str, ...]] = {"packed": ("codes", "levels"), "fp": ("embeddings",)}
SHARED_FILES = ("users", "items", "train")
#: bundle.json keys of the Parquet files, and the columns each one must have.
FILE_COLUMNS: dict[str, tuple[str, ...]] = {
    "codes": ("codes",), "levels": ("levels",), "embeddings": ("embedding",),
    "users": ("raw_id",), "items": ("raw_id",), "train": ("user", "item"),
}
#: bundle.json fields that describe the stored table (beside num_layers, n_users, n_items).
TABLE_FIELDS = ("method", "bits", "dim", "groups", "needs_propagation", "group_weights", "level_dtype",
                "levels_shared")
LEVEL_DTYPES = {"float16": np.float16, "float32": np.float32}


def file_name(key: str) -> str:
    """The file a bundle.json key names by default (an overwrite on object stores may pick another)."""
    return f"{key}.parquet"


def body_digest(info: dict[str, Any]) -> str:
    """sha256 of bundle.json's content without its own ``bundle_sha256`` (a flipped byte
    in bundle.json itself is caught too)."""
    body = {k: v for k, v in info.items() if k != "bundle_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


__all__ = ["BUNDLE_FORMAT", "BUNDLE_JSON", "BUNDLE_VERSION", "FILE_COLUMNS", "KINDS", "KIND_FILES", "LEVEL_DTYPES",
           "SHARED_FILES", "TABLE_FIELDS", "body_digest", "file_name"]
