"""Time to quality: Recall@20 against training seconds for several schedules, two runs at a time.

Each run is ``gnaq train`` in its own process at one thread with a wall-clock budget
(``--time-limit``); runs go two at a time, one a core (the next starts when one ends), so
that runs compared are measured beside each other on the same machine. The report gives, per run, the training seconds to each Recall@20
threshold (``--targets``), Recall@20 at fixed training times (``--at``), the best
Recall@20, and a plot of the curves (``<out>/time-to-quality.png``).

    python benchmarks/bench_time_to_quality.py --dataset data/gowalla --config configs/gowalla.yaml \\
        --out /tmp/ttq --minutes 5 \\
        --run fp-s4:method=fp,steps=4 --run fp-b8192:method=fp,batch=8192,lr=0.005,quant_lr=null

A run is ``NAME:key=value,...`` with keys ``method``, ``steps`` (steps per epoch),
``batch`` (a batch size instead), ``lr``, ``quant_lr``, ``epochs``, ``warmup``,
``loss`` (bpr or softmax), ``neg`` (negatives per positive), ``temp`` (softmax temperature),
``eval`` (epochs between evaluations) and ``minutes`` (its own budget, evaluations
included). Training seconds exclude evaluation (each eval record's ``train_seconds``); a
finished run is not run again (delete its folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

KEYS = {"method": "model.method", "steps": "schedule.steps_per_epoch", "batch": "schedule.batch_size",
        "lr": "optim.lr", "quant_lr": "optim.quant_lr", "epochs": "schedule.epochs",
        "warmup": "schedule.warmup_epochs", "eval": "schedule.eval_every", "minutes": "schedule.max_minutes",
        "loss": "schedule.loss", "neg": "schedule.num_negatives", "temp": "schedule.temperature"}


def parse_run(text: str) -> tuple[str, dict[str, str]]:
    name, _, spec = text.partition(":")
    values = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    unknown = set(values) - set(KEYS)
    if not name or unknown:
        raise SystemExit(f"--run {text!r}: want NAME:key=value,... with keys {', '.join(KEYS)}")
    return name, values


def command(args, name: str, values: dict[str, str]) -> list[str]:
    cmd = [sys.executable, "-m", "gnaq_dist.cli", "train", "--dataset", args.dataset, "--out",
           str(Path(args.out) / name), "--time-limit", str(args.minutes), "--no-progress",
           "--set", "threads=1", "--set", "eval.ks=[20]"]
    for c in args.config:
        cmd += ["--config", c]
    if values.get("method") == "fp":
        cmd += ["--set", "model.bits=null"]
    for key, value in values.items():
        cmd += ["--set", f"{KEYS[key]}={value}"]
    return cmd


def curve(out: Path, name: str) -> list[tuple[float, float]]:
    path = out / name / "metrics.jsonl"
    points = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "eval" and "train_seconds" in record:
            points.append((float(record["train_seconds"]), float(record["recall@20"])))
    return points


def summarise(points: list[tuple[float, float]], targets: list[float], at: list[float]) -> dict:
    row: dict = {"best": max((r for _, r in points), default=float("nan")),
                 "seconds": points[-1][0] if points else float("nan")}
    for t in targets:
        row[f"to {t}"] = next((s for s, r in points if r >= t), None)
    for m in at:
        before = [r for s, r in points if s <= m * 60]
        row[f"@{m:g} min"] = before[-1] if before else None
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=5.0, help="training budget of each run (--time-limit)")
    p.add_argument("--run", action="append", default=[], required=True, help="NAME:key=value,... (see above)")
    p.add_argument("--targets", default="0.1202,0.15", help="Recall@20 thresholds to time")
    p.add_argument("--at", default="1,2,5", help="training minutes at which to read Recall@20")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [parse_run(r) for r in args.run]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = [(n, v) for n, v in runs if not (out / n / "summary.json").exists()]
    running: list = []
    t0 = time.monotonic()
    while pending or running:  # a pool of --parallel runs: the next starts when one ends
        while pending and len(running) < args.parallel:
            name, values = pending.pop(0)
            log = open(out / f"{name}.log", "w")
            proc = subprocess.Popen(command(args, name, values), stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((name, proc, log))
            print(f"[{time.monotonic() - t0:5.0f} s] started {name}", flush=True)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                state = "done" if proc.returncode == 0 else f"exit {proc.returncode}, see {out / (name + '.log')}"
                print(f"[{time.monotonic() - t0:5.0f} s] {name}: {state}", flush=True)
        time.sleep(1)
    targets = [float(t) for t in args.targets.split(",")]
    at = [float(m) for m in args.at.split(",")]
    rows = {name: summarise(curve(out, name), targets, at) for name, _ in runs}
    cols = [f"to {t}" for t in targets] + [f"@{m:g} min" for m in at] + ["best", "seconds"]

    def fmt(v) -> str:
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) and v < 1 else f"{v:.0f}")

    lines = ["| run | " + " | ".join(f"s {c}" if c.startswith("to") else c for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(fmt(rows[name][c]) for c in cols) + " |" for name, _ in runs]
    report = "\n".join(lines)
    print(report)
    (out / "time-to-quality.md").write_text(report + "\n")
    (out / "time-to-quality.json").write_text(json.dumps({n: {"spec": v, **rows[n], "curve": curve(out, n)}
                                                          for n, v in runs}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, _ in runs:
        pts = curve(out, name)
        ax.plot([s for s, _ in pts], [r for _, r in pts], marker=".", label=name)
    for t in targets:
        ax.axhline(t, color="grey", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("training seconds (one thread, evaluation excluded)")
    ax.set_ylabel("Recall@20")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "time-to-quality.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
