"""Run logs as JSON lines: one record per event, read back by plots and reports.

Why JSON lines: appending a line is atomic enough for a log, a crashed run keeps
everything it logged so far, and ``jq``/pandas read it directly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator


class RunLog:
    """Appends ``{"event": ..., "time": ..., **fields}`` records to ``path``."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.start = time.time()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": round(time.time() - self.start, 3), **fields}
        if self.path is not None:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record, default=_jsonable) + "\n")
        return record


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def read_log(path: str | Path, event: str | None = None) -> Iterator[dict[str, Any]]:
    with Path(path).open() as fh:
        for line in fh:
            line = line.strip()
            if line:
                record = json.loads(line)
                if event is None or record.get("event") == event:
                    yield record
