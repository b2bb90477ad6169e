"""What ``--overwrite`` may replace, and outputs that must not overlap their inputs.

Why: ``--overwrite`` used to replace whatever was at OUT: a folder of someone's
documents, the raw logs being ingested (``gnaq ingest SRC SRC --overwrite``), the
checkpoint being exported (``gnaq export CK CK --overwrite``). Two checks now run before
any data is read, so a refusal changes nothing:

* :func:`check_replaceable` — an existing OUT is replaced only when it is an output of
  the same kind that this project wrote: its commit mark (the JSON file written last,
  see :mod:`gnaq_dist.storage`) names that kind, and it holds nothing but the mark and
  the files the mark lists. A file, a foreign folder, an output of another kind (a
  checkpoint where a bundle is to go) or a gnaq output with files added by hand is left
  alone. An empty directory holds nothing to lose and may be replaced.
* :func:`check_disjoint` — OUT equal to, inside, or containing the command's input
  (ingest's SOURCE, export's checkpoint, partition's dataset) is refused, with or
  without ``--overwrite``: writing it would replace the input, or put the output where
  later reads of the input find it. A SOURCE glob overlaps OUT only where something
  under OUT could match it.

Only the standard library and :mod:`gnaq_dist.storage` (fsspec to resolve a URI).
"""

from __future__ import annotations

import json
import os
import posixpath
from fnmatch import fnmatchcase
from typing import Any, Callable

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.storage import is_local, join, output_exists, resolve

#: Each kind of output: its commit mark's file name and the test its parsed content passes.
#: The strings are the writers' own constants (ingest.writer.FORMAT, checkpoint.FORMAT,
#: distributed.partition_store.KIND, bundle.BUNDLE_FORMAT, synthetic_logs.META_FILE),
#: spelled out so that this check imports none of those modules (tests/test_adversarial_inputs.py
#: asserts they agree).
OUTPUT_KINDS: dict[str, tuple[str, Callable[[dict[str, Any]], bool]]] = {
    "dataset": ("manifest.json", lambda m: m.get("format") == "gnaq-dataset"),
    "checkpoint": ("manifest.json", lambda m: m.get("format") == "gnaq-checkpoint"),
    "partition": ("manifest.json", lambda m: m.get("kind") == "gnaq-partition"),
    "bundle": ("bundle.json", lambda m: m.get("format") == "gnaq-bundle"),
    "generated log": ("_generate.json",
                      lambda m: isinstance(m.get("files"), list) and isinstance(m.get("spec"), dict)),
}

#: The columns ``gnaq generate`` writes to a single ``.parquet`` file (weight optional).
GENERATED_COLUMNS = ("user_id", "item_id", "timestamp")


def _read_mark(fs: Any, path: str) -> dict[str, Any] | None:
    """The commit mark at ``path`` as a JSON object, or None (missing, unreadable, not an object)."""
    try:
        with fs.open(path, "rb") as handle:
            data = json.loads(handle.read().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _listed_names(mark: dict[str, Any]) -> set[str] | None:
    """File names a commit mark lists (``files``: {key: {"path": ...}} or [{"path": ...}];
    a checkpoint's {name: {...}}); None if ``files`` has another shape."""
    files = mark.get("files")
    if isinstance(files, dict):
        return {e["path"] if isinstance(e, dict) and isinstance(e.get("path"), str) else str(k)
                for k, e in files.items()}
    if isinstance(files, list) and all(isinstance(e, dict) and isinstance(e.get("path"), str) for e in files):
        return {e["path"] for e in files}
    return None


def _identify(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[str, str, dict[str, Any]] | None:
    """``(kind, mark name, mark content)`` of the gnaq output directory at ``uri``, or None."""
    fs, path = resolve(uri, storage_options)
    marks: dict[str, dict[str, Any] | None] = {}
    for kind, (mark, test) in OUTPUT_KINDS.items():
        if mark not in marks:
            marks[mark] = _read_mark(fs, join(path, mark))
        content = marks[mark]
        if content is not None and test(content):
            return kind, mark, content
    return None


def _is_generated_parquet(fs: Any, path: str) -> bool:
    """A single Parquet file with exactly the columns ``gnaq generate`` writes."""
    try:
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as handle:
            names = pq.ParquetFile(handle).schema_arrow.names
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return names in (list(GENERATED_COLUMNS), [*GENERATED_COLUMNS, "weight"])


def check_replaceable(uri: str, storage_options: dict[str, Any] | None, kind: str) -> None:
    """Refuse (``GnaqInputError``) to let ``--overwrite`` replace ``uri`` unless it is
    absent, an empty directory, or a gnaq ``kind`` holding only what its mark lists."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    fs, path = resolve(uri, storage_options)
    if not output_exists(fs, path):
        return
    keep = "--overwrite replaces only an output gnaq wrote, so it is left as it is"
    if not fs.isdir(path):
        if kind == "generated log" and path.endswith(".parquet") and _is_generated_parquet(fs, path):
            return
        raise GnaqInputError(f"{uri}: exists and is a file, not a gnaq {kind}; {keep}")
    found = _identify(uri, storage_options)
    if found is None:
        raise GnaqInputError(f"{uri}: not a gnaq {kind} (no {OUTPUT_KINDS[kind][0]} of one); {keep}")
    found_kind, mark, content = found
    if found_kind != kind:
        raise GnaqInputError(f"{uri}: a gnaq {found_kind}, not a {kind}; {keep}")
    listed = _listed_names(content)
    if listed is None:
        raise GnaqInputError(f"{uri}/{mark}: its files list has an unexpected shape; {keep}")
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    foreign = [n for n in names if n not in listed and n != mark]
    if foreign:
        raise GnaqInputError(f"{uri}: holds {foreign[0]!r}, which its {mark} does not list "
                             f"({len(foreign)} such entries); {keep}")


# -- inputs and outputs ----------------------------------------------------------------------
def _same_store(a: Any, b: Any) -> bool:
    if is_local(a) and is_local(b):
        return True
    return a is b or (type(a) is type(b) and getattr(a, "storage_options", None) == getattr(b, "storage_options", None))


def _canonical(fs: Any, path: str) -> str:
    if is_local(fs):
        return os.path.realpath(path)
    return posixpath.normpath("/" + path.strip("/"))


def _inside(child: str, parent: str) -> bool:
    """``child`` is ``parent`` or below it (normalised paths)."""
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _magic_at(path: str) -> int:
    """Index of the first glob character, or -1."""
    hits = [path.find(c) for c in "*?[" if c in path]
    return min(hits) if hits else -1


def _matches(pattern: list[str], parts: list[str]) -> bool:
    """Path components ``parts`` match glob components ``pattern`` (``**``: any depth)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _matches(pattern[1:], parts[1:])


def _may_match_below(pattern: list[str], parts: list[str]) -> bool:
    """Something strictly below ``parts`` could match ``pattern``."""
    if not parts:
        return bool(pattern)
    if not pattern:
        return False
    if pattern[0] == "**":
        return True
    return fnmatchcase(parts[0], pattern[0]) and _may_match_below(pattern[1:], parts[1:])


def _glob_reaches(pattern: str, out: str) -> bool:
    """Could a glob read anything at or under ``out``? Matched files are read, and matched
    directories are read whole; so: ``out`` or one of its ancestors matches, or something
    below ``out`` could."""
    pat, parts = pattern.strip("/").split("/"), out.strip("/").split("/")
    return any(_matches(pat, parts[:k]) for k in range(1, len(parts) + 1)) or _may_match_below(pat, parts)


def check_disjoint(out_uri: str, in_uri: str, storage_options: dict[str, Any] | None = None, *,
                   out_name: str = "OUT", in_name: str = "SOURCE") -> None:
    """Refuse (``GnaqInputError``) an output equal to, inside, or containing the input."""
    out_fs, out_path = resolve(out_uri, storage_options)
    in_fs, in_path = resolve(in_uri, storage_options)
    if not _same_store(out_fs, in_fs):
        return
    out_c = _canonical(out_fs, out_path)
    magic = _magic_at(in_path)
    if magic >= 0:  # a glob: its fixed directory, and the pattern below it
        head = in_path[:magic]
        base = head.rsplit("/", 1)[0] if "/" in head else ""
        base_c = _canonical(in_fs, base or ("/" if in_path.startswith("/") else "."))
        rest = in_path[len(base):].lstrip("/")
        if _inside(base_c, out_c) or (_inside(out_c, base_c) and out_c != base_c
                                      and _glob_reaches(rest, out_c[len(base_c):])):
            raise GnaqInputError(f"{out_uri}: {out_name} overlaps {in_name} {in_uri} (the glob reaches it or it "
                                 f"contains the glob's folder); choose an {out_name} outside the input")
        return
    in_c = _canonical(in_fs, in_path)
    if out_c == in_c:
        how = "is the same location as"
    elif _inside(out_c, in_c):
        how = "is inside"
    elif _inside(in_c, out_c):
        how = "contains"
    else:
        return
    raise GnaqInputError(f"{out_uri}: {out_name} {how} {in_name} {in_uri}; choose an {out_name} "
                         f"outside the input (nothing was written)")


__all__ = ["GENERATED_COLUMNS", "OUTPUT_KINDS", "check_disjoint", "check_replaceable"]
