"""``gnaq ingest SOURCE OUT``: argparse glue over :func:`gnaq_dist.ingest.ingest`.

Config layering: dataclass defaults < each ``--config`` YAML in order < convenience
flags (``--user-col`` ...) < ``--set key.path=value``. Bad input exits with status 2 and
a one-line message (``GnaqInputError``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import yaml

from gnaq_dist.config import from_dict, parse_override, read_yaml
from gnaq_dist.errors import EXIT_BAD_INPUT, GnaqInputError
from gnaq_dist.ingest.config import IngestConfig


def add_ingest_arguments(parser: argparse.ArgumentParser) -> None:
    """Add SOURCE, OUT and the ingest options to ``parser``."""
    parser.add_argument("source", help="interaction logs: fsspec URI, glob, directory, Hive tree or file")
    parser.add_argument("out", help="output dataset directory (fsspec URI)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config (repeatable, later wins)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. split.seed=3")
    parser.add_argument("--format", choices=["parquet", "lightgcn"])
    for flag, key in (("--user-col", "user"), ("--item-col", "item"), ("--timestamp-col", "timestamp"),
                      ("--weight-col", "weight"), ("--event-col", "event"), ("--split-col", "split")):
        parser.add_argument(flag, dest=f"col_{key}", metavar="NAME", help=f"source column for {key} ('none' = no such column)")
    parser.add_argument("--keep-events", metavar="A,B", help="keep only rows whose event column is one of these")
    parser.add_argument("--split", choices=["random", "temporal_global", "temporal_user", "column"], help="split strategy")
    parser.add_argument("--test-fraction", type=float)
    parser.add_argument("--valid-fraction", type=float)
    parser.add_argument("--test-last-n", type=int)
    parser.add_argument("--valid-last-n", type=int)
    parser.add_argument("--cutoff", help="temporal_global: ISO date/datetime or unix seconds")
    parser.add_argument("--valid-cutoff", help="temporal_global: start of the validation window")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--kcore-users", type=int, metavar="N")
    parser.add_argument("--kcore-items", type=int, metavar="N")
    parser.add_argument("--no-dedup", action="store_true", help="keep repeated (user, item) rows")
    parser.add_argument("--append", action="store_true", help="add new rows to the existing dataset OUT")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option (value parsed as YAML), e.g. endpoint_url=http://127.0.0.1:9000")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The convenience flags as a config fragment (only those given)."""
    cfg: dict[str, Any] = {}
    if args.format:
        cfg["format"] = args.format
    cols = {}
    for key in ("user", "item", "timestamp", "weight", "event", "split"):
        value = getattr(args, f"col_{key}")
        if value is not None:
            cols[key] = None if value.lower() in ("none", "null", "") and key not in ("user", "item") else value
    if cols:
        cfg["columns"] = cols
    if args.keep_events is not None:
        cfg["keep_events"] = [e.strip() for e in args.keep_events.split(",") if e.strip()]
    split = {}
    for attr, key in (("split", "strategy"), ("test_fraction", "test_fraction"), ("valid_fraction", "valid_fraction"),
                      ("test_last_n", "test_last_n"), ("valid_last_n", "valid_last_n"), ("seed", "seed")):
        if getattr(args, attr) is not None:
            split[key] = getattr(args, attr)
    for attr in ("cutoff", "valid_cutoff"):
        value = getattr(args, attr)
        if value is not None:
            split[attr] = int(value) if value.lstrip("-").isascii() and value.lstrip("-").isdigit() else value
    if split:
        cfg["split"] = split
    if args.kcore_users is not None:
        cfg["kcore_users"] = args.kcore_users
    if args.kcore_items is not None:
        cfg["kcore_items"] = args.kcore_items
    if args.no_dedup:
        cfg["dedup"] = False
    if args.no_progress:
        cfg["progress"] = False
    opts = {}
    for text in args.storage_option:
        if "=" not in text:
            raise GnaqInputError(f"--storage-option {text!r}: expected key=value")
        key, raw = text.split("=", 1)
        opts[key.strip()] = yaml.safe_load(raw) if raw else ""
    if opts:
        cfg["storage_options"] = opts
    return cfg


def _config_from_args(args: argparse.Namespace) -> IngestConfig:
    """defaults < --config files < flags < --set."""
    merged: dict[str, Any] = {}
    for path in args.config:
        merged = _merge(merged, read_yaml(path))
        from_dict(IngestConfig, merged, str(path))
    merged = _merge(merged, _flags(args))
    where = "command line"
    for text in args.set:
        merged = _merge(merged, parse_override(text))
    return from_dict(IngestConfig, merged, where)


def summary(manifest: dict[str, Any], out: str, seconds: float) -> str:
    """One paragraph: counts, density, output, time and throughput."""
    src = manifest["source"]
    counts = ", ".join(f"{k} {v:,}" for k, v in manifest["counts"].items())
    seconds = max(seconds, 1e-9)
    return (
        f"Ingested {src['rows_read']:,} rows from {src['n_files']} file(s) of {src['uri']} into {out} "
        f"(version {manifest['version']}): {manifest['n_users']:,} users, {manifest['n_items']:,} items, "
        f"{manifest['n_interactions']:,} interactions ({counts}), density {manifest['density']:.6f}; "
        f"dropped {src['duplicates_dropped']:,} duplicates, {src['filtered_by_event']:,} by event filter, "
        f"{src['dropped_by_kcore']:,} by k-core, {src['known_pairs_dropped']:,} already present; "
        f"{seconds:.2f} s, {src['rows_read'] / seconds:,.0f} rows/s. Fingerprint {manifest['fingerprint'][:16]}."
    )


def run_ingest_from_args(args: argparse.Namespace) -> int:
    """Build the config, ingest, print the summary; 0 on success, 2 on bad input."""
    from gnaq_dist.ingest.pipeline import ingest

    t0 = time.perf_counter()
    try:
        config = _config_from_args(args)
        manifest = ingest(args.source, args.out, config, overwrite=args.overwrite, append=args.append)
    except GnaqInputError as exc:
        print(f"gnaq ingest: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(summary(manifest, args.out, time.perf_counter() - t0))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gnaq ingest", description="Ingest interaction logs into a gnaq dataset.")
    add_ingest_arguments(parser)
    from gnaq_dist import interrupts

    try:
        with interrupts.handled():
            return run_ingest_from_args(parser.parse_args(argv))
    except KeyboardInterrupt as exc:
        print(f"gnaq ingest: interrupted by {interrupts.signal_name(exc)}; unfinished output was removed",
              file=sys.stderr)
        return interrupts.exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
