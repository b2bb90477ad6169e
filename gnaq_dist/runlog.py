"""Run logs as JSON lines: one record per event, read back by plots and reports.

Why JSON lines: appending a line is atomic enough for a log, a crashed run keeps
everything it logged so far, and ``jq``/pandas read it directly. A log at a URI other
than a local path (``s3://``, ``memory://``: an object store cannot append) is written
whole after every record, each write all or nothing (:func:`gnaq_dist.storage.write_file`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator


class RunLog:
    """Appends ``{"event": ..., "time": ..., **fields}`` records to ``path`` (a local path or
    any fsspec URI; ``storage_options`` for the latter)."""

    def __init__(self, path: str | Path | None, storage_options: dict[str, Any] | None = None):
        self.path: Path | None = None
        self.start = time.time()
        self._remote = None  # (fs, path, lines so far) for a log on a store that cannot append
        if path is None:
            return
        if isinstance(path, Path) or "://" not in str(path):
            self.path = Path(path)
        else:
            from gnaq_dist.storage import is_local, resolve

            fs, inner = resolve(str(path), storage_options)
            if is_local(fs):  # file://
                self.path = Path(inner)
            else:
                lines: list[str] = []
                if fs.exists(inner):  # a rerun into the same place appends, as a local log does
                    with fs.open(inner, "rb") as fh:
                        lines = fh.read().decode("utf-8").splitlines(keepends=True)
                self._remote = (fs, inner, lines)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": round(time.time() - self.start, 3), **fields}
        return self.append(record)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add a record made elsewhere (another process's log), as it is."""
        line = json.dumps(record, default=_jsonable) + "\n"
        if self.path is not None:
            with self.path.open("a") as fh:
                fh.write(line)
        elif self._remote is not None:
            from gnaq_dist.storage import write_file

            fs, inner, lines = self._remote
            lines.append(line)
            write_file(fs, inner, "".join(lines).encode("utf-8"))
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
