"""Large synthetic interaction logs, streamed to Parquet (``gnaq generate``).

Unlike :mod:`gnaq_dist.synthetic` (a small in-memory dataset for tests), this writes a
raw *log* that ``gnaq ingest`` reads with its default columns: ``user_id`` (string),
``item_id`` (string), ``timestamp`` (int64 unix seconds) and, optionally, ``weight``
(float32, a 1-5 rating). Rows are generated block by block and written row group by row
group, so memory grows with the number of users and items (the latent model), never
with the number of rows.

The hidden structure, which a recommender can learn:

* ``C`` clusters on a ring (default ``C = clamp(round(sqrt(items)), 2, 1024)``). Every
  user and every item belongs to one cluster.
* A row picks its user with probability proportional to the user's activity, drawn from
  a Pareto law (tail exponent ``user_alpha``, default 2: a power-law degree tail).
* Its item comes from the user's own cluster with probability ``p_own`` (0.75), from a
  neighbouring cluster on the ring (c-1 or c+1) with ``p_near`` (0.15), otherwise from
  the whole catalogue (0.10). Within the chosen set, items are drawn by popularity, a
  Zipf-Mandelbrot law ``(rank + item_offset)^-item_exponent`` (1.0 and 10). Items are dealt
  round-robin to clusters in popularity order, so every cluster holds the same
  popularity mass and an item's overall frequency follows the Zipf law.
* Repeated (user, item) rows happen, as in real logs (ingest de-duplicates them).
* Timestamps grow with the row index over ``span_days`` (plus up to an hour of jitter),
  so file order is roughly time order and temporal splits make sense.
* ``weight`` (optional): a rating around 4 for items of the user's own cluster, around
  2.5 otherwise, rounded and clipped to 1..5.

Ids do not reveal the structure: user ``u<k>`` has a random cluster; item ``i<k>`` has a
random popularity rank. :func:`hidden_clusters` gives the clusters back (tests).

Determinism: row ``j`` depends only on the spec (seed, sizes, rows, parameters) and
``j``: the same spec gives the same rows whatever the row-group size or file count
(blocks of ``BLOCK_ROWS`` rows, each with its own seeded stream).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gnaq_dist.errors import GnaqInputError

BLOCK_ROWS = 1 << 16  # rows per seeded generation block (fixed: the content does not depend on I/O sizes)
SCHEMA_VERSION = 1
META_FILE = "_generate.json"  # written into a directory output; ingest skips names starting with '_'


@dataclass
class LogSpec:
    """What to generate. Everything that changes the rows is here (and in the metadata file)."""

    users: int
    items: int
    rows: int
    seed: int = 0
    clusters: int | None = None  # latent clusters on a ring (None: round(sqrt(items)) in [2, 1024], <= items)
    p_own: float = 0.75  # a row's item comes from the user's own cluster
    p_near: float = 0.15  # ... from a neighbouring cluster on the ring (the rest: the whole catalogue)
    user_alpha: float = 2.0  # Pareto tail exponent of user activity (P(activity > x) ~ x^-alpha)
    item_exponent: float = 1.0  # Zipf-Mandelbrot exponent of item popularity
    item_offset: float = 10.0  # Zipf-Mandelbrot offset q: weight (rank + q)^-exponent
    start: int = 1_735_689_600  # first timestamp (2025-01-01 UTC, unix seconds)
    span_days: int = 365  # timestamps spread over this many days
    weight: bool = False  # also write a float32 `weight` column (a 1..5 rating)

    @property
    def n_clusters(self) -> int:
        if self.clusters is not None:
            return self.clusters
        return int(min(self.items, 1024, max(2, round(math.sqrt(self.items)))))

    def validate(self) -> None:
        for name in ("users", "items", "rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise GnaqInputError(f"--{name}: must be a positive integer, got {value!r}")
        if self.users >= 2**40 or self.items >= 2**40:
            raise GnaqInputError("--users / --items: at most 2^40")
        if self.seed < 0:
            raise GnaqInputError(f"--seed: must be >= 0, got {self.seed}")
        if self.clusters is not None and not 1 <= self.clusters <= self.items:
            raise GnaqInputError(f"--clusters: must be in [1, items={self.items}], got {self.clusters}")
        if not (0.0 <= self.p_own <= 1.0 and 0.0 <= self.p_near <= 1.0 and self.p_own + self.p_near <= 1.0):
            raise GnaqInputError("p_own and p_near: must be in [0, 1] with p_own + p_near <= 1")
        if self.user_alpha <= 0 or self.item_exponent < 0 or self.item_offset < 0:
            raise GnaqInputError("user_alpha must be > 0, item_exponent and item_offset >= 0")
        if self.span_days < 0:
            raise GnaqInputError(f"span_days: must be >= 0, got {self.span_days}")


def _stream(spec: LogSpec, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(spec.seed, spawn_key=key)))


class LatentModel:
    """The hidden users x items structure of a spec: O(users + items) memory.

    Item ``rank`` r (0 = most popular) has id label ``item_label[r]``; the cluster-sorted
    order lists, for each cluster, its ranks in popularity order.
    """

    def __init__(self, spec: LogSpec):
        spec.validate()
        self.spec = spec
        C = self.n_clusters = spec.n_clusters
        U, I = spec.users, spec.items
        rng_u, rng_i = _stream(spec, 0, 0), _stream(spec, 0, 1)
        # Users: Pareto activity (power-law tail), uniform random cluster; id u<k> = index k.
        activity = rng_u.pareto(spec.user_alpha, U) + 1.0
        self.user_cdf = np.cumsum(activity)
        del activity
        self.user_cluster = rng_u.integers(0, C, U).astype(np.int32)
        # Items by popularity rank: Zipf-Mandelbrot weights, clusters dealt round-robin in rank
        # order (cluster labels shuffled), id labels a random permutation of the ranks.
        w = (np.arange(I, dtype=np.float64) + 1.0 + spec.item_offset) ** -spec.item_exponent
        self.item_cdf = np.cumsum(w)
        self.rank_cluster = rng_i.permutation(C).astype(np.int32)[np.arange(I) % C]
        self.item_label = rng_i.permutation(I).astype(np.int64)
        # Cluster-sorted ranks with per-cluster cumulative weights shifted by the cluster index:
        # segment c of `seg_cdf` runs from c to c + 1, so one searchsorted of (c + u) draws
        # from cluster c for a whole vector of different c.
        order = np.argsort(self.rank_cluster, kind="stable")  # ranks ascending within a cluster
        self.sorted_rank = order.astype(np.int64)
        counts = np.bincount(self.rank_cluster, minlength=C)
        self.seg_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.seg_end = self.seg_start + counts
        ws = w[order]
        cum = np.cumsum(ws)
        seg_base = np.repeat(cum[self.seg_start] - ws[self.seg_start], counts)
        seg_total = np.repeat(np.add.reduceat(ws, self.seg_start), counts)
        self.seg_cdf = np.repeat(np.arange(C, dtype=np.float64), counts) + (cum - seg_base) / seg_total
        del w, ws, cum, seg_base, seg_total

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.user_cdf, self.user_cluster, self.item_cdf, self.rank_cluster,
                                       self.item_label, self.sorted_rank, self.seg_cdf))

    def block(self, b: int) -> dict[str, np.ndarray]:
        """Rows ``[b * BLOCK_ROWS, min((b + 1) * BLOCK_ROWS, rows))`` as integer arrays."""
        spec = self.spec
        first = b * BLOCK_ROWS
        n = min(BLOCK_ROWS, spec.rows - first)
        rng = _stream(spec, 1, b)
        C = self.n_clusters
        users = np.searchsorted(self.user_cdf, rng.random(n) * self.user_cdf[-1], side="right")
        users = np.minimum(users, spec.users - 1)
        own_c = self.user_cluster[users].astype(np.int64)
        r = rng.random(n)
        side = np.where(rng.random(n) < 0.5, -1, 1)
        target = np.where(r < spec.p_own, own_c, (own_c + side) % C)
        in_cluster = r < spec.p_own + spec.p_near
        pos = np.searchsorted(self.seg_cdf, target + rng.random(n), side="right")
        pos = np.clip(pos, self.seg_start[target], self.seg_end[target] - 1)
        rank = self.sorted_rank[pos]
        glob = np.minimum(np.searchsorted(self.item_cdf, rng.random(n) * self.item_cdf[-1], side="right"),
                          spec.items - 1)
        rank = np.where(in_cluster, rank, glob)
        span = spec.span_days * 86_400
        row = np.arange(first, first + n, dtype=np.int64)
        ts = spec.start + (row * span) // max(spec.rows, 1) + rng.integers(0, 3600, n)
        out = {"user": users.astype(np.int64), "item": self.item_label[rank], "timestamp": ts.astype(np.int64)}
        if spec.weight:
            same = self.rank_cluster[rank] == own_c
            rating = np.where(same, 4.0, 2.5) + rng.normal(0.0, 0.8, n)
            out["weight"] = np.clip(np.rint(rating), 1, 5).astype(np.float32)
        return out


def hidden_clusters(spec: LogSpec) -> tuple[np.ndarray, np.ndarray]:
    """(cluster of user ``u<k>`` at [k], cluster of item ``i<k>`` at [k]) for ``spec``."""
    model = LatentModel(spec)
    item_cluster = np.empty(spec.items, dtype=np.int32)
    item_cluster[model.item_label] = model.rank_cluster
    return model.user_cluster.copy(), item_cluster


class _Rows:
    """Sequential reader over the blocks: ``take(n)`` returns the next ``n`` rows."""

    def __init__(self, model: LatentModel):
        self.model = model
        self.next_block = 0
        self.buffer: dict[str, np.ndarray] | None = None
        self.offset = 0

    def take(self, n: int) -> dict[str, np.ndarray]:
        parts: list[dict[str, np.ndarray]] = []
        while n > 0:
            if self.buffer is None or self.offset >= len(self.buffer["user"]):
                self.buffer = self.model.block(self.next_block)
                self.next_block += 1
                self.offset = 0
            k = min(n, len(self.buffer["user"]) - self.offset)
            parts.append({key: v[self.offset:self.offset + k] for key, v in self.buffer.items()})
            self.offset += k
            n -= k
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _arrow_schema(spec: LogSpec):
    import pyarrow as pa

    fields = [("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())]
    if spec.weight:
        fields.append(("weight", pa.float32()))
    return pa.schema(fields)


def _table(rows: dict[str, np.ndarray], schema):
    import pyarrow as pa
    import pyarrow.compute as pc

    def ids(prefix: str, ints: np.ndarray) -> pa.Array:
        return pc.binary_join_element_wise(pa.scalar(prefix), pa.array(ints).cast(pa.string()), "")

    cols = [ids("u", rows["user"]), ids("i", rows["item"]), pa.array(rows["timestamp"])]
    if "weight" in rows:
        cols.append(pa.array(rows["weight"]))
    return pa.Table.from_arrays(cols, schema=schema)


def _file_sizes(rows: int, files: int) -> list[int]:
    base, extra = divmod(rows, files)
    return [base + (1 if f < extra else 0) for f in range(files)]


def generate_log(
    out: str | os.PathLike,
    spec: LogSpec,
    *,
    files: int = 1,
    row_group_rows: int = 1_000_000,
    overwrite: bool = False,
    progress: bool = True,
    compression: str = "zstd",
) -> dict[str, Any]:
    """Write the log of ``spec`` to ``out`` atomically; returns a summary dict.

    ``out`` ending in ``.parquet``: one file (``files`` must be 1). Otherwise a directory
    of ``part-NNNNN.parquet`` files plus ``_generate.json`` (the spec and the summary).
    Everything is written under a hidden temporary sibling name and renamed into place at
    the end (:mod:`gnaq_dist.storage`'s atomic writer); on any failure the temporary
    output is removed and ``out`` is untouched. Local paths only.
    """
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from gnaq_dist.storage import AtomicOutput, atomic_path

    spec.validate()
    if isinstance(files, bool) or not isinstance(files, int) or files < 1:
        raise GnaqInputError(f"--files: must be a positive integer, got {files!r}")
    if isinstance(row_group_rows, bool) or not isinstance(row_group_rows, int) or row_group_rows < 1:
        raise GnaqInputError(f"--row-group-rows: must be a positive integer, got {row_group_rows!r}")
    if files > spec.rows:
        raise GnaqInputError(f"--files: {files} files for {spec.rows} rows would leave a file empty")
    text = os.fspath(out)
    if "://" in text and not text.startswith("file://"):
        raise GnaqInputError(f"{text}: gnaq generate writes local paths only")
    target = Path(text.removeprefix("file://")).absolute()
    single = target.name.endswith(".parquet")
    if single and files != 1:
        raise GnaqInputError(f"{target}: a .parquet output is one file; use a directory for --files {files}")
    if target.exists() and not overwrite:
        raise GnaqInputError(f"{target}: output already exists (use --overwrite)")
    if overwrite:  # only a log gnaq generate wrote: a directory with _generate.json, or its one .parquet file
        from gnaq_dist.overwrite import check_replaceable

        check_replaceable(str(target), None, "generated log")
    if not target.parent.is_dir():
        raise GnaqInputError(f"{target.parent}: parent directory does not exist")

    t0 = time.perf_counter()
    model = LatentModel(spec)
    schema = _arrow_schema(spec)
    rows = _Rows(model)
    written: list[dict[str, Any]] = []
    bar = tqdm(total=spec.rows, unit="rows", unit_scale=True, desc="generate", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)

    def write_part(path: str, name: str, n_file: int) -> None:
        groups = 0
        with pq.ParquetWriter(path, schema, compression=compression) as writer:
            done = 0
            while done < n_file:
                k = min(row_group_rows, n_file - done)
                writer.write_table(_table(rows.take(k), schema), row_group_size=k)
                done += k
                groups += 1
                bar.update(k)
        written.append({"path": name, "rows": n_file, "row_groups": groups, "bytes": os.path.getsize(path)})

    def summary() -> dict[str, Any]:
        seconds = time.perf_counter() - t0
        return {
            "schema_version": SCHEMA_VERSION, "spec": asdict(spec), "clusters": model.n_clusters,
            "files": written, "rows": spec.rows, "bytes": sum(w["bytes"] for w in written),
            "row_group_rows": row_group_rows, "seconds": round(seconds, 3),
            "rows_per_second": round(spec.rows / max(seconds, 1e-9), 1), "model_bytes": model.nbytes(),
            "columns": schema.names,
        }

    try:
        if single:  # one file, renamed into place
            with atomic_path(target, overwrite=overwrite) as tmp:
                write_part(tmp, target.name, spec.rows)
                info = summary()
        else:  # a directory, committed by its _generate.json
            with AtomicOutput(str(target), mode="overwrite" if overwrite else "create", mark=META_FILE,
                              exists_error="{uri}: output already exists (use --overwrite)") as out:
                for f, n_file in enumerate(_file_sizes(spec.rows, files)):
                    name = out.unique_name(f"part-{f:05d}.parquet")  # this attempt's own, on object stores
                    write_part(out.new_file(name), name, n_file)
                info = summary()
                out.commit(info)
    finally:
        bar.close()
    info["out"] = str(target)
    return info


# -- command line ------------------------------------------------------------------------------

def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output: a directory of part-*.parquet files, or a single FILE.parquet")
    parser.add_argument("--users", type=int, required=True, help="user id space (u0..u<U-1>)")
    parser.add_argument("--items", type=int, required=True, help="item id space (i0..i<I-1>)")
    parser.add_argument("--rows", type=int, required=True, help="log rows (before ingest's de-duplication)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--row-group-rows", type=int, default=1_000_000, metavar="N",
                        help="rows per Parquet row group (also what is held in memory at once)")
    parser.add_argument("--files", type=int, default=1, help="split the rows over this many files (directory output)")
    parser.add_argument("--clusters", type=int, default=None, help="latent clusters (default: sqrt(items), 2..1024)")
    parser.add_argument("--weight", action="store_true", help="add a float32 `weight` column (1..5 rating)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_generate_from_args(args: argparse.Namespace) -> int:
    spec = LogSpec(users=args.users, items=args.items, rows=args.rows, seed=args.seed, clusters=args.clusters,
                   weight=args.weight)
    summary = generate_log(args.out, spec, files=args.files, row_group_rows=args.row_group_rows,
                           overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("out", "rows", "bytes", "clusters", "seconds", "rows_per_second")}))
    return 0


def iter_rows(spec: LogSpec, chunk: int = BLOCK_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """The rows of ``spec`` as integer arrays (``user`` index, ``item`` label, ...), in chunks."""
    rows = _Rows(LatentModel(spec))
    done = 0
    while done < spec.rows:
        k = min(chunk, spec.rows - done)
        yield rows.take(k)
        done += k


__all__ = ["BLOCK_ROWS", "LatentModel", "LogSpec", "generate_log", "hidden_clusters", "iter_rows",
           "add_generate_arguments", "run_generate_from_args"]


def main(argv: list[str] | None = None) -> int:
    """``python -m gnaq_dist.synthetic_logs OUT ...``: ``gnaq generate`` without the other commands' imports."""
    parser = argparse.ArgumentParser(prog="gnaq generate", description=__doc__.splitlines()[0])
    add_generate_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_generate_from_args(args)
    except GnaqInputError as exc:
        print(f"gnaq generate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
