"""Scaling benchmark: generate -> ingest -> train GNAQ 2-bit on W=1 and W=2 Ray workers -> evaluate.

For each size (a fraction of the largest: by default 5M users, 1M items, 100M log rows)
it runs, each stage in its own process so that peak RSS (``ru_maxrss`` from ``wait4``)
is that stage's own:

1. ``python -m gnaq_dist.synthetic_logs`` (= ``gnaq generate``): the Parquet log;
2. ``python -m gnaq_dist.ingest.cli`` (= ``gnaq ingest``, random split, dedup);
3. for each W > 1: ``gnaq partition`` (METIS over the whole graph, once, in its own
   process: the workers then read the owners from ``distributed.partition_file`` and none
   of them holds the whole graph);
4. for each W: ``train_on_ray`` with ``schedule.max_steps`` steps of GNAQ 2-bit
   (warm-up 0: every step is quantized; 2-bit gradients with error feedback; the graph
   split by owner, or ``--propagation sampled`` blocks), then its final evaluation (all
   test users against all items, or ``--set eval.max_users=N``).

Every stage writes ``<workdir>/<size>/<stage>.json``; a stage whose JSON exists is not
run again (resumable: re-run the same command after an interruption). ``--repeat N``
trains each worker count N times, alternating W=1 and W=2, so that each pair's ratio is
measured in about the same machine state; the report gives every pair and the median.
Afterwards it writes ``scale.csv``, ``scale.md`` and ``scale.png`` (log-log time and
memory against log rows) into ``--report-dir``.

    python benchmarks/bench_scale.py --fractions 0.001,0.01 --workdir /tmp/gnaq-scale
    python benchmarks/bench_scale.py --fractions 0.001,0.01 --report-dir docs/img  # report only what exists

The ``gnaq`` entry point itself imports torch for its other commands (about 250 MiB
more RSS), so the generate and ingest stages run their modules' standalone entries.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def mem_available_mib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


class StageKilled(RuntimeError):
    pass


def run_measured(cmd: list[str], log_path: Path, timeout: float | None = None,
                 min_free_mib: float = 0.0) -> tuple[int, float, float, float]:
    """Run ``cmd`` in its own session (output to ``log_path``).

    Returns (exit status, wall seconds, peak RSS MiB of that process from ``wait4``, the
    largest drop of the machine's MemAvailable during the run in MiB: every process of the
    stage, Ray's included, but also whatever else the machine ran meanwhile). The
    stage's whole process group is killed if it runs past ``timeout`` or MemAvailable
    falls below ``min_free_mib`` (so a size too large for the machine fails this stage,
    not the other jobs), and :class:`StageKilled` says why.
    """
    t0 = time.perf_counter()
    base = mem_available_mib()
    low = base
    why = None
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            free = mem_available_mib()
            low = min(low, free)
            if deadline is not None and time.monotonic() > deadline:
                why = f"ran past {timeout:.0f} s"
            elif free < min_free_mib:
                why = f"MemAvailable fell to {free:,.0f} MiB (< {min_free_mib:,.0f}); the stage had taken {base - free:,.0f} MiB"
            if why:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if why:
        raise StageKilled(f"{log_path.stem}: killed, {why} (peak RSS of its main process "
                          f"{usage.ru_maxrss / 1024:,.0f} MiB, {time.perf_counter() - t0:.0f} s)")
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024, base - low


def size_name(fraction: Fraction) -> str:
    return "full" if fraction == 1 else f"1-{fraction.denominator}" if fraction.numerator == 1 else f"f{float(fraction):g}"


def scaled(n: int, fraction: Fraction) -> int:
    return max(1, int(n * fraction))


# -- stages (each in a child process) ----------------------------------------------------------

def stage_generate(d: Path, users: int, items: int, rows: int, args) -> dict[str, Any]:
    log = d / "log"
    cmd = [sys.executable, "-m", "gnaq_dist.synthetic_logs", str(log), "--users", str(users), "--items",
           str(items), "--rows", str(rows), "--seed", str(args.seed), "--files", str(max(1, rows // 25_000_000)),
           "--row-group-rows", str(args.row_group_rows), "--overwrite", "--no-progress"]
    rc, wall, rss, sysmem = run_measured(cmd, d / "generate.log", args.stage_timeout, args.min_free_mib)
    if rc != 0:
        raise RuntimeError(f"generate failed ({rc}): see {d / 'generate.log'}")
    meta = json.loads((log / "_generate.json").read_text())
    return {"wall_s": wall, "seconds": meta["seconds"], "rows": rows, "rows_per_s": rows / meta["seconds"],
            "bytes": meta["bytes"], "files": len(meta["files"]), "peak_rss_mib": rss, "clusters": meta["clusters"], "machine_mem_drop_mib": sysmem}


def stage_ingest(d: Path, args) -> dict[str, Any]:
    out = d / "ds"
    cmd = [sys.executable, "-m", "gnaq_dist.ingest.cli", str(d / "log"), str(out), "--overwrite", "--no-progress"]
    rc, wall, rss, sysmem = run_measured(cmd, d / "ingest.log", args.stage_timeout, args.min_free_mib)
    if rc != 0:
        raise RuntimeError(f"ingest failed ({rc}): see {d / 'ingest.log'}")
    m = json.loads((out / "manifest.json").read_text())
    rows = m["source"]["rows_read"]
    return {"wall_s": wall, "rows_per_s": rows / wall, "peak_rss_mib": rss, "machine_mem_drop_mib": sysmem,
            "n_users": m["n_users"],
            "n_items": m["n_items"], "n_interactions": m["n_interactions"], "counts": m["counts"],
            "duplicates_dropped": m["source"]["duplicates_dropped"],
            "seconds_before_write": m["source"]["seconds_before_write"],
            "dataset_bytes": sum(f["bytes"] for f in m["files"].values())}


def stage_partition(d: Path, workers: int, args) -> dict[str, Any]:
    out = d / f"partition_w{workers}"
    cmd = [sys.executable, "-m", "gnaq_dist.cli", "partition", str(d / "ds"), str(out), "--workers", str(workers),
           "--overwrite"]
    rc, wall, rss, sysmem = run_measured(cmd, d / f"partition_w{workers}.log", args.stage_timeout, args.min_free_mib)
    if rc != 0:
        raise RuntimeError(f"partition W={workers} failed ({rc}): see {d / f'partition_w{workers}.log'}")
    m = json.loads((out / "manifest.json").read_text())
    return {"wall_s": wall, "peak_rss_mib": rss, "machine_mem_drop_mib": sysmem, "uri": str(out),
            "method": m["partition"]["method"], "rows_per_rank": m["partition"]["rows_per_rank"],
            "edge_cut": m["edge_cut"], "seconds": m["seconds"]}


def train_stage_name(workers: int, repeat: int) -> str:
    """``train_w2`` for the first run of a worker count, ``train_w2_r3`` for its third (``--repeat``)."""
    return f"train_w{workers}" + (f"_r{repeat}" if repeat > 1 else "")


def repeats_done(d: Path) -> int:
    """The highest repeat index whose training JSON exists in ``d`` (1 when there is none)."""
    found = [int(m.group(1)) for f in d.glob("train_w*_r*.json") if (m := re.fullmatch(r"train_w\d+_r(\d+)\.json", f.name))]
    return max(found, default=1)


def stage_train(d: Path, workers: int, args, repeat: int = 1) -> dict[str, Any]:
    name = train_stage_name(workers, repeat)
    result = d / f"{name}.summary.json"
    part = d / f"partition_w{workers}.json"  # computed apart: the workers read its owners
    extra = [f"--set=distributed.partition_file={json.loads(part.read_text())['uri']}"] if part.exists() else []
    cmd = [sys.executable, __file__, "--child-train", str(d / "ds"), "--child-out", str(d / name.replace("train_", "run_")),
           "--child-result", str(result), "--workers", str(workers), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--fanouts", args.fanouts, "--eval-batch", str(args.eval_batch),
           "--propagation", args.propagation] + [f"--set={kv}" for kv in args.set] + extra
    rc, wall, rss, sysmem = run_measured(cmd, d / f"{name}.log", args.stage_timeout, args.min_free_mib)
    if rc != 0:
        raise RuntimeError(f"training W={workers} failed ({rc}): see {d / f'{name}.log'}")
    s = json.loads(result.read_text())
    wire = s["wire"]
    return {
        "wall_s": wall, "driver_peak_rss_mib": rss, "machine_mem_drop_mib": sysmem, "workers": workers,
        "steps": s["steps"],
        "s_per_step": s["seconds_per_step"], "edges_per_s": s["edges_per_second"],
        "steady_s_per_step": (s.get("steady") or {}).get("seconds_per_step"),
        "steady_edges_per_s": (s.get("steady") or {}).get("edges_per_second"),
        "first_step_s": (s.get("steady") or {}).get("first_step_seconds"),
        "train_s": s["phase_seconds"]["fp"] + s["phase_seconds"]["quantized"],
        "eval_s": s["phase_seconds"]["eval"], "worker_peak_rss_mib": s["worker_peak_rss_mb"],
        "worker_shards": s.get("worker_shards"),
        "bytes_per_step": wire["train_bytes_per_step"], "fp32_bytes_per_step": wire["train_fp32_bytes_per_step"],
        "gather_bytes": wire["gather"]["total_bytes"], "storage": s["storage"], "metrics": s["metrics"],
        "rows": s.get("rows"), "partition_method": (s.get("partition") or {}).get("method"),
        "partition_file": bool(extra),
        "setup_and_ray_s": s.get("_outer_seconds", wall) - s["phase_seconds"]["fp"] - s["phase_seconds"]["quantized"]
        - s["phase_seconds"]["eval"],
    }


def child_train(args) -> None:
    """In the child: one ``train_on_ray`` run; its summary (+ the call's wall time) to --child-result."""
    from gnaq_dist.config import load_config
    from gnaq_dist.distributed.ray_launch import train_on_ray
    from gnaq_dist.train.config import TrainConfig

    overrides = [
        f"dataset={args.child_train}", f"out={args.child_out}", "model.method=gnaq", "model.bits=2",
        "schedule.epochs=1000000", "schedule.warmup_epochs=0", "schedule.eval_every=0",
        f"schedule.max_steps={args.steps}", f"schedule.batch_size={args.batch_size}", "schedule.num_negatives=4",
        f"schedule.propagation={args.propagation}", f"schedule.fanouts=[{args.fanouts}]", "distributed.grad_bits=2",
        f"eval.batch_size={args.eval_batch}", "threads=1", "progress=false",
    ] + args.set
    config = load_config(TrainConfig, [], overrides)
    t0 = time.perf_counter()
    summary = train_on_ray(config, args.workers)
    summary["_outer_seconds"] = time.perf_counter() - t0
    summary.pop("history", None)
    Path(args.child_result).write_text(json.dumps(summary, default=str))


# -- driver ------------------------------------------------------------------------------------

def run_size(fraction: Fraction, args) -> dict[str, Any]:
    users, items, rows = (scaled(n, fraction) for n in (args.users, args.items, args.rows))
    d = Path(args.workdir) / size_name(fraction)
    d.mkdir(parents=True, exist_ok=True)
    spec = {"users": users, "items": items, "rows": rows, "seed": args.seed, "steps": args.steps,
            "batch_size": args.batch_size, "fanouts": args.fanouts, "row_group_rows": args.row_group_rows,
            "eval_batch": args.eval_batch, "propagation": args.propagation, "set": args.set}
    spec_file = d / "spec.json"
    if args.report_only and spec_file.exists():  # report a size as it was run (sizes may differ in --set)
        spec = json.loads(spec_file.read_text())
    elif spec_file.exists() and json.loads(spec_file.read_text()) != spec:
        raise SystemExit(f"{d}: made with other parameters ({spec_file}); use another --workdir")
    else:
        spec_file.write_text(json.dumps(spec))
    out: dict[str, Any] = {"size": size_name(fraction), "fraction": float(fraction), **spec}
    stages: list[tuple[str, Any]] = [("generate", lambda: stage_generate(d, users, items, rows, args)),
                                     ("ingest", lambda: stage_ingest(d, args))]
    stages += [(f"partition_w{w}", (lambda w=w: stage_partition(d, w, args))) for w in args.workers if w > 1]
    # Repeats alternate the worker counts (W=1, W=2, W=1, W=2, ...) so that each pair sees
    # the machine in about the same state: on a shared VM a run's speed drifts by 10-20 %.
    stages += [(train_stage_name(w, i), (lambda w=w, i=i: stage_train(d, w, args, i)))
               for i in range(1, max(args.repeat, repeats_done(d)) + 1) for w in args.workers]
    for name, fn in stages:
        if name.split("_")[0] not in args.stages:
            continue
        path = d / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
            print(f"[{out['size']}] {name}: done before, kept ({path})", flush=True)
            continue
        if args.report_only:
            continue
        print(f"[{out['size']}] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn()
        except StageKilled as exc:
            (d / f"{name}.killed.json").write_text(json.dumps({"reason": str(exc)}))
            out["killed"] = str(exc)
            print(f"[{out['size']}] {exc}; the rest of this size is skipped", flush=True)
            break
        path.write_text(json.dumps(result, indent=2))
        out[name] = result
        rss = result.get("peak_rss_mib") or max(result.get("worker_peak_rss_mib") or [0])
        print(f"[{out['size']}] {name}: {time.perf_counter() - t0:.1f} s, peak RSS {rss:,.0f} MiB", flush=True)
    return out


def flat_row(r: dict[str, Any], workers: list[int]) -> dict[str, Any]:
    g, i = r.get("generate", {}), r.get("ingest", {})
    row: dict[str, Any] = {
        "size": r["size"], "users": r["users"], "items": r["items"], "rows": r["rows"],
        "log_mib": g.get("bytes", 0) / 2**20 if g else None,
        "gen_s": g.get("seconds"), "gen_rows_per_s": g.get("rows_per_s"), "gen_rss_mib": g.get("peak_rss_mib"),
        "ingest_s": i.get("wall_s"), "ingest_rows_per_s": i.get("rows_per_s"), "ingest_rss_mib": i.get("peak_rss_mib"),
        "n_users": i.get("n_users"), "n_items": i.get("n_items"), "n_interactions": i.get("n_interactions"),
        "n_train": (i.get("counts") or {}).get("train"),
    }
    for w in workers:
        t = r.get(f"train_w{w}")
        if not t:
            continue
        st = t["storage"]
        row.update({
            "bytes_per_node": st.get("bytes_per_node"), "fp32_bytes_per_node": st.get("fp32_bytes_per_node"),
            "floor_bytes_per_node": st.get("floor_bytes_per_node"),
            f"w{w}_s_per_step": t["s_per_step"], f"w{w}_edges_per_s": t["edges_per_s"],
            f"w{w}_steady_edges_per_s": t.get("steady_edges_per_s"),
            f"w{w}_worker_rss_mib": max(t["worker_peak_rss_mib"]), f"w{w}_worker_rss_min_mib": min(t["worker_peak_rss_mib"]),
            f"w{w}_driver_rss_mib": t["driver_peak_rss_mib"],
            f"w{w}_machine_mem_drop_mib": t.get("machine_mem_drop_mib"),
            f"w{w}_setup_s": t["setup_and_ray_s"], f"w{w}_eval_s": t["eval_s"],
            f"w{w}_bytes_per_step": t["bytes_per_step"], f"w{w}_fp32_bytes_per_step": t["fp32_bytes_per_step"],
            f"w{w}_recall20": t["metrics"].get("recall@20"),
        })
        row[f"w{w}_shards"] = t.get("worker_shards")
        row[f"w{w}_worker_rss_all"] = t["worker_peak_rss_mib"]
        part = r.get(f"partition_w{w}")
        if part and t.get("partition_file"):
            row.update({f"w{w}_partition_s": part["wall_s"], f"w{w}_partition_rss_mib": part["peak_rss_mib"]})
    if r.get("killed"):
        row["killed"] = r["killed"]
    if len(workers) >= 2:
        row.update(pair_ratios(r, workers[0], workers[-1]))
        a, b = r.get(train_stage_name(workers[0], 1)), r.get(train_stage_name(workers[-1], 1))
        if a and b:
            row["throughput_ratio"], row["steady_throughput_ratio"] = throughput_ratios(a, b)
    return row


def throughput_ratios(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float | None]:
    """Run ``b``'s throughput over run ``a``'s: all steps, and after the first (None if either lacks it)."""
    sa, sb = a.get("steady_edges_per_s"), b.get("steady_edges_per_s")
    return b["edges_per_s"] / a["edges_per_s"], (sb / sa if sa and sb else None)


def pair_ratios(r: dict[str, Any], w1: int, w2: int) -> dict[str, Any]:
    """Throughput of W=w2 over W=w1 for each repeat that ran both (all steps, and after the first)."""
    pairs = []
    i = 1
    while train_stage_name(w1, i) in r or train_stage_name(w2, i) in r:
        a, b = r.get(train_stage_name(w1, i)), r.get(train_stage_name(w2, i))
        if a and b:
            ratio, steady = throughput_ratios(a, b)
            pairs.append({"repeat": i, "ratio": ratio, "steady_ratio": steady,
                          f"w{w1}_s_per_step": a["s_per_step"], f"w{w2}_s_per_step": b["s_per_step"]})
        i += 1
    return {"pairs": pairs} if len(pairs) > 1 else {}


def pairs_line(pairs: list[dict[str, Any]], w1: int, w2: int) -> str:
    """One sentence: every alternated pair's ratio, then the median and the range."""
    def spread(key: str) -> str:
        vals = [p[key] for p in pairs if p.get(key)]
        if not vals:
            return "-"
        return (", ".join(f"{v:.2f}x" for v in vals)
                + f" (median {statistics.median(vals):.2f}x, {min(vals):.2f}-{max(vals):.2f}x)")
    steps = "; ".join(f"{p[f'w{w1}_s_per_step']:.2f} / {p[f'w{w2}_s_per_step']:.2f}" for p in pairs)
    return (f"W={w2}/W={w1} in {len(pairs)} alternated pairs: {spread('ratio')}; after the first step "
            f"{spread('steady_ratio')}; s/step W={w1} / W={w2}: {steps}")


def _f(v: Any, spec: str = ",.0f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def markdown(rows: list[dict[str, Any]], workers: list[int]) -> str:
    w1, w2 = workers[0], workers[-1]
    lines = [
        "| size | users / items / log rows | train edges | generate rows/s (peak RSS MiB) | ingest rows/s (peak RSS MiB) "
        f"| table B/node (fp32, floor) | W={w1} edges/s | W={w2} edges/s | W={w2}/W={w1} (after the first step) "
        f"| W={w2} MB/step (fp32) "
        f"| worker peak RSS MiB W={w1} / W={w2} | Ray start + setup s W={w1} / W={w2} | eval s W={w1} / W={w2} | Recall@20 W={w1} / W={w2} |",
        "|" + "---|" * 14,
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {_f(r['users'])} / {_f(r['items'])} / {_f(r['rows'])} | {_f(r.get('n_train'))} "
            f"| {_f(r.get('gen_rows_per_s'))} ({_f(r.get('gen_rss_mib'))}) "
            f"| {_f(r.get('ingest_rows_per_s'))} ({_f(r.get('ingest_rss_mib'))}) "
            f"| {_f(r.get('bytes_per_node'), '.1f')} ({_f(r.get('fp32_bytes_per_node'), '.0f')}, "
            f"{_f(r.get('floor_bytes_per_node'), '.1f')}) "
            f"| {_f(r.get(f'w{w1}_edges_per_s'))} | {_f(r.get(f'w{w2}_edges_per_s'))} "
            f"| {_f(r.get('throughput_ratio'), '.2f')}x ({_f(r.get('steady_throughput_ratio'), '.2f')}x) "
            f"| {_f((r.get(f'w{w2}_bytes_per_step') or 0) / 1e6, '.2f')} "
            f"({_f((r.get(f'w{w2}_fp32_bytes_per_step') or 0) / 1e6, '.2f')}) "
            f"| {_f(r.get(f'w{w1}_worker_rss_mib'))} / {_f(r.get(f'w{w2}_worker_rss_mib'))} "
            f"| {_f(r.get(f'w{w1}_setup_s'), '.1f')} / {_f(r.get(f'w{w2}_setup_s'), '.1f')} "
            f"| {_f(r.get(f'w{w1}_eval_s'), '.1f')} / {_f(r.get(f'w{w2}_eval_s'), '.1f')} "
            f"| {_f(r.get(f'w{w1}_recall20'), '.4f')} / {_f(r.get(f'w{w2}_recall20'), '.4f')} |"
        )
    for r in rows:
        parts = [f"W={w}: {_f(r.get(f'w{w}_partition_s'), '.1f')} s, peak RSS {_f(r.get(f'w{w}_partition_rss_mib'))} MiB"
                 for w in workers if r.get(f"w{w}_partition_s")]
        if parts:
            lines.append(f"\n{r['size']}: partitioned apart (gnaq partition, METIS): " + "; ".join(parts))
    for r in rows:
        if r.get("pairs"):
            lines.append(f"\n{r['size']}: " + pairs_line(r["pairs"], w1, w2))
    for r in rows:
        if r.get("killed"):
            lines.append(f"\n{r['size']}: {r['killed']}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], workers: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paired = [r for r in rows if r.get("pairs")]
    fig, axes = plt.subplots(1, 4 if paired else 3, figsize=(21 if paired else 16, 4.4))
    ax_t, ax_m, ax_s = axes[:3]
    x = [r["rows"] for r in rows]

    def series(ax, key, label, marker, color, style="-"):
        pts = [(xi, r[key]) for xi, r in zip(x, rows) if r.get(key)]
        if pts:
            ax.plot(*zip(*pts), marker=marker, color=color, linestyle=style, label=label)

    styles = ["-", "--", ":", "-."]
    series(ax_t, "gen_s", "generate (s)", "o", "C0")
    series(ax_t, "ingest_s", "ingest (s)", "s", "C1")
    for j, w in enumerate(workers):
        ls = styles[j % len(styles)]
        series(ax_t, f"w{w}_s_per_step", f"train s/step W={w}", "^", "C2", ls)
        series(ax_t, f"w{w}_setup_s", f"Ray start + setup W={w} (s)", "x", "C3", ls)
        series(ax_t, f"w{w}_eval_s", f"evaluation W={w} (s)", "v", "C4", ls)
        if w > 1:
            series(ax_t, f"w{w}_partition_s", f"partition W={w} (s, own process)", "D", "C6", ls)
    series(ax_m, "gen_rss_mib", "generate", "o", "C0")
    series(ax_m, "ingest_rss_mib", "ingest", "s", "C1")
    for j, w in enumerate(workers):
        series(ax_m, f"w{w}_worker_rss_mib", f"train worker W={w} (max)", "^", "C2", styles[j % len(styles)])
        if w > 1:
            series(ax_m, f"w{w}_worker_rss_min_mib", f"train worker W={w} (min)", "v", "C5", styles[j % len(styles)])
            series(ax_m, f"w{w}_partition_rss_mib", f"partition W={w} (METIS, own process)", "D", "C6",
                   styles[j % len(styles)])
    # Each worker's peak against the rows it propagates (own + halo): one line for every W
    # means memory follows the shard, not the whole table.
    for j, w in enumerate(workers):
        pts = [(sh["own_nodes"] + sh.get("halo_nodes", 0), rss) for r in rows
               for sh, rss in zip(r.get(f"w{w}_shards") or [], r.get(f"w{w}_worker_rss_all") or []) if sh]
        if pts:
            ax_s.plot(*zip(*pts), marker="^v<>"[j % 4], linestyle="none", color=f"C{2 + j}",
                      label=f"train worker, W={w}")
    for ax, title, xlabel in ((ax_t, "time", "log rows"), (ax_m, "peak RSS (MiB)", "log rows"),
                              (ax_s, "worker peak RSS (MiB) against its shard", "rows propagated (own + halo)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if paired:  # --repeat: each pair's ratio, so that the spread between runs is seen
        ax_p = axes[3]
        w1, w2 = workers[0], workers[-1]
        for j, r in enumerate(paired):
            ax_p.plot([q["repeat"] for q in r["pairs"]], [q["ratio"] for q in r["pairs"]], marker="o",
                      color=f"C{j}", label=f"{r['size']}, all steps")
            steady = [(q["repeat"], q["steady_ratio"]) for q in r["pairs"] if q.get("steady_ratio")]
            if steady:
                ax_p.plot(*zip(*steady), marker="x", linestyle="--", color=f"C{j}",
                          label=f"{r['size']}, after the first step")
        ax_p.axhline(w2 / w1, color="grey", linestyle=":", label="linear")
        ax_p.set_ylim(bottom=0)
        ax_p.set_xticks(sorted({q["repeat"] for r in paired for q in r["pairs"]}))
        ax_p.set_xlabel(f"pair (W={w1}, then W={w2})")
        ax_p.set_title(f"throughput W={w2} / W={w1}, alternated pairs")
        ax_p.grid(True, alpha=0.3)
        ax_p.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=5_000_000, help="largest size: users")
    p.add_argument("--items", type=int, default=1_000_000, help="largest size: items")
    p.add_argument("--rows", type=int, default=100_000_000, help="largest size: log rows")
    p.add_argument("--fractions", default="1/100,1/10,1", help="sizes as fractions of the largest, e.g. 1/1000,1/100")
    p.add_argument("--workers", default="1,2", help="Ray worker counts to train with")
    p.add_argument("--steps", type=int, default=20, help="training steps per run (schedule.max_steps)")
    p.add_argument("--repeat", type=int, default=1,
                   help="train each worker count this many times, alternating (W=1, W=2, W=1, ...), and report "
                        "every pair's throughput ratio with its median and range")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--fanouts", default="10,10,10", help="for --propagation sampled")
    p.add_argument("--propagation", default="full", choices=["full", "sampled"],
                   help="full: the graph split by owner (the training default); sampled: DGL blocks")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every training run (repeatable), e.g. eval.max_users=20000")
    p.add_argument("--eval-batch", type=int, default=512, help="users scored at once (eval.batch_size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--row-group-rows", type=int, default=1_000_000)
    p.add_argument("--stage-timeout", type=float, default=None, help="kill a stage after this many seconds")
    p.add_argument("--min-free-mib", type=float, default=3072,
                   help="kill a stage (its whole process group) when the machine's MemAvailable falls below this")
    p.add_argument("--workdir", default="/tmp/gnaq-scale", help="per-size stage outputs (kept: resumable)")
    p.add_argument("--report-dir", default=None, help="where scale.csv/.md/.png go (default: the workdir)")
    p.add_argument("--report-only", action="store_true", help="run nothing; report the stages already done")
    p.add_argument("--stages", default="generate,ingest,partition,train",
                   help="which stages to run (e.g. generate,ingest to prepare the data first)")
    p.add_argument("--child-train", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--child-result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_train:
        args.workers = int(args.workers)
        child_train(args)
        return
    if args.repeat < 1:
        p.error(f"--repeat {args.repeat}: must be at least 1")
    args.workers = [int(w) for w in args.workers.split(",")]
    args.stages = {s.strip() for s in args.stages.split(",")}
    fractions = sorted(Fraction(f.strip()) for f in args.fractions.split(","))
    rows = []
    for fraction in fractions:
        r = run_size(fraction, args)
        rows.append(flat_row(r, args.workers))
    report = Path(args.report_dir or args.workdir)
    report.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (report / "scale.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows)
    table = markdown(rows, args.workers)
    (report / "scale.md").write_text(table)
    plot(rows, args.workers, report / "scale.png")
    print(table)
    print(f"wrote {report / 'scale.csv'}, {report / 'scale.md'}, {report / 'scale.png'}")


if __name__ == "__main__":
    main()
