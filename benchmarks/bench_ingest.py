"""Ingest benchmark: our streamed ingest vs. a bare pyarrow read + dictionary_encode.

Generates (once per parameter set, reused afterwards) a power-law interaction log with
string user/item ids and int64 timestamps in several Parquet files, written chunk by
chunk so generation never holds the whole log. Each measurement runs in a fresh
subprocess so its peak RSS (``ru_maxrss``) is its own.

    python benchmarks/bench_ingest.py --rows 20000000 --workdir /tmp/gnaq-bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def zipf_sampler(n: int, s: float, rng: np.random.Generator):
    """Sample ids 0..n-1 with P(k) ~ 1/(rank+1)^s, ranks shuffled over ids."""
    cdf = np.cumsum(1.0 / np.arange(1, n + 1, dtype=np.float64) ** s)
    cdf /= cdf[-1]
    perm = rng.permutation(n)
    return lambda size: perm[np.minimum(np.searchsorted(cdf, rng.random(size)), n - 1)]


def _ids(prefix: str, ints: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(pa.scalar(prefix), pa.array(ints).cast(pa.string()), "")


def generate(workdir: Path, rows: int, files: int, users: int, items: int, seed: int, chunk: int = 1_000_000) -> Path:
    params = {"rows": rows, "files": files, "users": users, "items": items, "seed": seed, "version": 1}
    data = workdir / "log"
    marker = workdir / "params.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return data
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    user_of, item_of = zipf_sampler(users, 0.9, rng), zipf_sampler(items, 1.0, rng)
    per_file = -(-rows // files)
    written = 0
    t0 = time.perf_counter()
    for f in range(files):
        n_file = min(per_file, rows - written)
        with pq.ParquetWriter(data / f"part-{f:03d}.parquet", pa.schema(
            [("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())]), compression="zstd") as w:
            done = 0
            while done < n_file:
                n = min(chunk, n_file - done)
                ts = 1_735_689_600 + rng.integers(0, 365 * 86_400, n)
                w.write_table(pa.table({"user_id": _ids("user-", user_of(n)), "item_id": _ids("item-", item_of(n)), "timestamp": ts}))
                done += n
        written += n_file
        print(f"generated {written:,}/{rows:,} rows ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    marker.write_text(json.dumps(params))
    return data


def child_floor(data: Path) -> dict:
    import pyarrow.dataset as ds

    t0 = time.perf_counter()
    table = ds.dataset(str(data), format="parquet").to_table(columns=["user_id", "item_id", "timestamp"])
    users = pc.dictionary_encode(table.column("user_id"))
    items = pc.dictionary_encode(table.column("item_id"))
    n_users = len(pa.chunked_array(users.chunks).combine_chunks().dictionary) if users.num_chunks == 1 else len(pc.unique(table.column("user_id")))
    del items
    return {"rows": table.num_rows, "seconds": time.perf_counter() - t0, "n_users": n_users}


def child_ours(data: Path, out: Path) -> dict:
    from gnaq_dist.config import from_dict
    from gnaq_dist.ingest import IngestConfig, ingest

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    m = ingest(str(data), str(out), from_dict(IngestConfig, {"progress": False, "split": {"strategy": "random"}}))
    return {"rows": m["source"]["rows_read"], "seconds": time.perf_counter() - t0, "n_users": m["n_users"],
            "n_items": m["n_items"], "kept": m["n_interactions"], "counts": m["counts"]}


def run_child(kind: str, data: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--data", str(data), "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the log is generated (reused); default: a temp dir")
    p.add_argument("--child", choices=["floor", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = child_floor(Path(args.data)) if args.child == "floor" else child_ours(Path(args.data), Path(args.out))
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gnaq-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = generate(workdir, args.rows, args.files, args.users, args.items, args.seed)
    size = sum(f.stat().st_size for f in data.glob("*.parquet"))
    print(f"log: {args.rows:,} rows in {args.files} files, {size / 2**20:.0f} MiB Parquet (zstd), {data}")
    results = {}
    for kind in ("floor", "ours"):
        results[kind] = r = run_child(kind, data, workdir / "out")
        label = "floor (pyarrow read + dictionary_encode)" if kind == "floor" else "ours (gnaq ingest, random split)"
        print(f"{label:42s} rows {r['rows']:,}  {r['seconds']:.1f} s  {r['rows'] / r['seconds']:,.0f} rows/s  "
              f"peak RSS {r['peak_rss_mib']:,.0f} MiB")
    o, f = results["ours"], results["floor"]
    print(f"ours: {o['n_users']:,} users, {o['n_items']:,} items, {o['kept']:,} interactions kept {o['counts']}")
    print(f"ratio ours/floor: time {o['seconds'] / f['seconds']:.2f}x, peak RSS {o['peak_rss_mib'] / f['peak_rss_mib']:.2f}x")
    shutil.rmtree(workdir / "out", ignore_errors=True)


if __name__ == "__main__":
    main()
