"""Reproduction: fp, GNAQ and the baselines on one dataset, under one protocol, over seeds.

Runs full precision, GNAQ 2-bit, GNAQ 2-bit with the straight-through ablation,
LSQ 2-bit, N2UQ 2-bit and BiGeaR 1-bit (or ``--methods``) with the same backbone, loss
and budget, under one of three protocols:

- ``shared-warmup``: the fp run doubles as the warm-up; its state after
  ``schedule.warmup_epochs`` starts every quantized method (same seed and batches, so
  identical to separate warm-ups), which trains the rest of ``schedule.epochs``.
- ``scratch``: no warm-up; every quantized method trains quantized from the first step,
  for ``schedule.epochs`` like fp.
- ``reference``: fp trains to convergence (at most ``schedule.epochs``, early stopping on
  ``schedule.early_stopping``, by default validation NDCG@20); every quantized method
  starts from the best fp epoch and trains at most ``schedule.epochs`` more with early
  stopping; the test metrics are those of the best validation evaluation.

Each seed (``seed``, ``seed + 1``, ...) runs the whole protocol; then every method's
step is timed round-robin on the same batches in this process
(:mod:`gnaq_dist.step_timing`). Writes ``results.json`` (every seed, mean and spread,
timing), ``results.md`` (mean ± standard deviation), ``results.csv`` (one row per seed
and method), ``results.png`` and one run directory per method (and seed) with its
``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.interactions import InteractionData
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.local import LocalTrainer, TrainResult, WarmStart
from gnaq_dist.runlog import RunLog, read_log

DEFAULT_METHODS: list[tuple[str, int | None]] = [
    ("fp", None), ("gnaq", 2), ("gnaq_ste", 2), ("lsq", 2), ("n2uq", 2), ("bigear", 1),
]
LABELS = {"fp": "LightGCN fp32", "gnaq": "GNAQ", "gnaq_ste": "GNAQ (STE ablation)",
          "gnaq_lat": "GNAQ (integer latent)", "lsq": "LSQ",
          "n2uq": "N2UQ", "bigear": "BiGeaR"}
PROTOCOLS = ("shared-warmup", "scratch", "reference")
REFERENCE_PATIENCE = 5  # evaluations without a better validation metric, when the config sets none
METRICS = ["recall@10", "recall@20", "ndcg@10", "ndcg@20"]


@dataclass
class Row:
    method: str
    bits: int | None
    result: TrainResult
    run_dir: Path
    seed: int = 0

    @property
    def label(self) -> str:
        return _label_of(self.method, self.bits)


def _label_of(method: str, bits: int | None) -> str:
    name = LABELS.get(method, method)
    return name if bits is None else f"{name} {bits}-bit"


def parse_methods(text: str) -> list[tuple[str, int | None]]:
    """``fp,gnaq:2,bigear:1`` -> [("fp", None), ("gnaq", 2), ("bigear", 1)]."""
    out: list[tuple[str, int | None]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, bits = part.partition(":")
        try:
            default = {"fp": None, "bigear": 1}.get(name, 2)
            out.append((name, int(bits) if bits else default))
        except ValueError as exc:
            raise GnaqInputError(f"--methods: bad bit width in {part!r}") from exc
    return out


def _method_config(base: TrainConfig, method: str, bits: int | None, out: Path, protocol: str = "shared-warmup",
                  seed: int | None = None) -> TrainConfig:
    """``base`` for one method under ``protocol`` (the reference protocol's quantized
    schedule is set once the fp run has converged: :func:`_after_fp`)."""
    if protocol not in PROTOCOLS:
        raise GnaqInputError(f"--protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    config = copy.deepcopy(base)
    config.model.method = method
    config.model.bits = bits
    config.out = str(out)
    if seed is not None:
        config.seed = seed
    if protocol == "scratch":
        config.schedule.warmup_epochs = 0
    elif protocol == "reference":
        stop = config.schedule.early_stopping
        stop.patience = stop.patience or REFERENCE_PATIENCE
        config.schedule.warmup_epochs = 0 if config.quantized else config.schedule.epochs
    config.validate()
    return config


def _after_fp(config: TrainConfig, fp: WarmStart, budget: int) -> TrainConfig:
    """The reference protocol's quantized schedule: from the best fp epoch, ``budget`` more epochs."""
    config = copy.deepcopy(config)
    config.schedule.warmup_epochs = fp.epoch
    config.schedule.epochs = fp.epoch + budget
    config.validate()
    return config


def _check_protocol_data(protocol: str, base: TrainConfig, data: InteractionData) -> None:
    """The reference protocol stops on a held-out split the dataset must have (exit 2 if not)."""
    if protocol == "reference":
        split = base.schedule.early_stopping.split
        try:
            data.split(split)
        except GnaqInputError:
            raise GnaqInputError(f"{data.name or 'the dataset'}: --protocol reference stops early on the {split} "
                                 f"split, which the dataset lacks (ingest with --valid-fraction 0.1)") from None


def _check_protocol_methods(protocol: str, methods: list[tuple[str, int | None]]) -> None:
    """The reference protocol starts every quantized method from the converged fp run."""
    if protocol == "reference" and not any(m == "fp" for m, _ in methods):
        raise GnaqInputError("--protocol reference: the quantized methods start from fp; add fp to --methods")


def _run_dir(out_dir: Path, method: str, bits: int | None, seed: int, n_seeds: int) -> Path:
    name = f"{method}{'' if bits is None else f'-{bits}bit'}"
    return out_dir / name if n_seeds == 1 else out_dir / f"seed{seed}" / name


def _say(base: TrainConfig, text: str) -> None:
    if base.progress:
        print(text, file=sys.stderr, flush=True)


def run_reproduction(
    base: TrainConfig,
    data: InteractionData,
    out_dir: str | Path,
    methods: list[tuple[str, int | None]] | None = None,
    protocol: str = "shared-warmup",
    seeds: int = 1,
    timing_rounds: int = 3,
    timing_batches: int = 4,
) -> list[Row]:
    """Every method under ``protocol`` for ``seeds`` seeds, then the step timing (0 rounds: none)."""
    methods = methods or DEFAULT_METHODS
    if seeds < 1:
        raise GnaqInputError(f"--seeds: {seeds} must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_list = [base.seed + i for i in range(seeds)]
    _check_protocol_data(protocol, base, data)
    _check_protocol_methods(protocol, methods)
    # Validate every configuration before any training starts.
    for m, b in methods:
        _method_config(base, m, b, out_dir, protocol)
    ordered = sorted(methods, key=lambda mb: mb[0] != "fp")  # fp first: it provides the warm start
    rows: list[Row] = []
    timing: list[dict] = []
    t0 = time.time()
    timing_start = None  # the fp table the timed methods start from: the first seed's
    for si, seed in enumerate(seed_list):
        warm_start: WarmStart | None = None
        for mi, (method, bits) in enumerate(ordered):
            _say(base, f"[{protocol}] seed {seed} ({si + 1}/{len(seed_list)}), {_label_of(method, bits)} "
                       f"({mi + 1}/{len(ordered)}), {(time.time() - t0) / 60:.1f} min so far")
            config = _method_config(base, method, bits, _run_dir(out_dir, method, bits, seed, seeds), protocol, seed)
            start = None
            if config.quantized and protocol == "shared-warmup" and warm_start is not None \
                    and warm_start.epoch == config.schedule.warmup_epochs:
                start = warm_start
            elif config.quantized and protocol == "reference":
                config = _after_fp(config, warm_start, base.schedule.epochs)
                start = warm_start
            log_path = Path(config.out) / "metrics.jsonl"
            if log_path.exists():
                log_path.unlink()
            trainer = LocalTrainer(config, data, RunLog(log_path))
            if method == "fp" and protocol == "reference":
                result = trainer.run()
                stop = result.early_stopping or {}
                warm_start = WarmStart(result.method.embed(None).detach().clone(), int(stop["best_epoch"]),
                                       float(stop["best_train_seconds"]), int(stop["best_step"]))
            elif method == "fp":
                result = trainer.run(capture_epoch=base.schedule.warmup_epochs or None)
                warm_start = result.warm_start
            else:
                result = trainer.run(warm_start=start)
            if si == 0 and method == "fp" and protocol != "scratch" and warm_start is not None:
                timing_start = warm_start.weight
            rows.append(Row(method, bits, result, Path(config.out), seed))
            _write_results(rows, base, out_dir, protocol, seed_list, timing)
    if timing_rounds:
        _say(base, f"[{protocol}] timing every method's step round-robin on {timing_batches} batches, "
                   f"{timing_rounds} rounds")
        from gnaq_dist.step_timing import time_steps_round_robin

        configs = [(_label_of(m, b), _method_config(base, m, b, out_dir / "timing", "shared-warmup", seed_list[0]))
                   for m, b in methods]
        for _, c in configs:
            c.schedule.early_stopping.patience = 0
        timed = time_steps_round_robin(configs, data, timing_start, timing_rounds, timing_batches,
                                       progress=base.progress)
        timing = [t.as_dict() for t in timed]
        _write_results(rows, base, out_dir, protocol, seed_list, timing)
    return rows


COLUMNS = ["method", "seed", "recall@10", "recall@20", "ndcg@10", "ndcg@20", "bytes_per_node", "compression",
           "ms_per_step", "s_per_epoch", "fp_epochs", "quant_epochs", "best_epoch"]
MD_COLUMNS = ["method", "recall@10", "recall@20", "ndcg@10", "ndcg@20", "bytes_per_node", "compression",
              "ms_per_step", "fp_epochs", "quant_epochs", "best_epoch"]


def _row_values(row: Row, timing: dict[str, float] | None = None) -> dict[str, object]:
    r = row.result
    stop = r.early_stopping or {}
    return {
        "method": row.label, "seed": row.seed,
        **{k: r.metrics.get(k) for k in METRICS},
        "bytes_per_node": r.storage["bytes_per_node"], "compression": r.storage["compression_ratio"],
        "ms_per_step": (timing or {}).get(row.label), "s_per_epoch": r.seconds_per_epoch,
        "fp_epochs": r.phase_epochs["fp"], "quant_epochs": r.phase_epochs["quantized"],
        "best_epoch": stop.get("best_epoch"),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def _summarize(rows: list[Row], timing: list[dict]) -> list[dict]:
    """One entry per method: every seed's values, and the mean and sample standard deviation."""
    ms = {t["method"]: t["median_ms"] for t in timing}
    out: dict[str, dict] = {}
    for row in rows:
        entry = out.setdefault(row.label, {"method": row.label, "method_key": row.method, "bits": row.bits,
                                           "run_dir": str(row.run_dir), "per_seed": []})
        entry["per_seed"].append(_row_values(row, ms))
    for entry in out.values():
        per = entry["per_seed"]
        entry["mean"], entry["std"] = {}, {}
        for key in METRICS + ["bytes_per_node", "compression", "s_per_epoch", "fp_epochs", "quant_epochs",
                              "best_epoch"]:
            values = [float(v[key]) for v in per if v[key] is not None]
            if values:
                entry["mean"][key], entry["std"][key] = _mean_std(values)
        entry["ms_per_step"] = ms.get(entry["method"])
        entry["timing"] = next((t for t in timing if t["method"] == entry["method"]), None)
    return list(out.values())


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.1f}"
    return str(value)


def _cell(entry: dict, key: str, n_seeds: int) -> str:
    if key == "method":
        return entry["method"]
    if key == "ms_per_step":
        return _fmt(entry["ms_per_step"])
    if key not in entry["mean"]:
        return "-"
    mean, std = entry["mean"][key], entry["std"][key]
    if key in METRICS:
        return f"{mean:.4f} ± {std:.4f}" if n_seeds > 1 else f"{mean:.4f}"
    if key in ("fp_epochs", "quant_epochs", "best_epoch"):
        return f"{mean:.1f}" if n_seeds > 1 and std else f"{mean:.0f}"
    return _fmt(mean)


PROTOCOL_TEXT = {
    "shared-warmup": "every quantized method starts from the fp run after {w} fp epochs and trains {q} quantized "
                     "epochs ({e} in all, like fp)",
    "scratch": "no warm-up: every method trains {e} epochs, the quantized ones quantized from the first step",
    "reference": "fp trains at most {e} epochs with early stopping; every quantized method starts from the best "
                 "fp epoch and trains at most {e} more, with early stopping (patience {p} evaluations every "
                 "{every} epochs on {split} {metric}); test metrics at the best {split} evaluation",
}


def _write_results(rows: list[Row], base: TrainConfig, out_dir: Path, protocol: str = "shared-warmup",
                  seeds: list[int] | None = None, timing: list[dict] | None = None) -> None:
    timing = timing or []
    seeds = seeds or [base.seed]
    ms = {t["method"]: t["median_ms"] for t in timing}
    with (out_dir / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(_row_values(r, ms) for r in rows)
    entries = _summarize(rows, timing)
    s = base.schedule
    stop = s.early_stopping
    text = PROTOCOL_TEXT[protocol].format(w=s.warmup_epochs, q=s.epochs - s.warmup_epochs, e=s.epochs,
                                          p=stop.patience or REFERENCE_PATIENCE, every=s.eval_every,
                                          split=stop.split, metric=stop.metric)
    budget = (f"{f'batch {s.batch_size}' if s.batch_size else f'{s.steps_per_epoch} steps an epoch'}, "
              f"{s.num_negatives} negatives, d = {base.model.dim}, L = {base.model.num_layers}, lr {base.optim.lr}"
              f" (quantized: {base.optim.rate('quantized')})")
    done = [seed for seed in seeds if any(r.seed == seed for r in rows)]  # a table written while seeds remain
    n = len(done)
    lines = ["| " + " | ".join(MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    lines += ["| " + " | ".join(_cell(e, c, n) for c in MD_COLUMNS) + " |" for e in entries]
    planned = "" if len(done) == len(seeds) else f" so far, of {', '.join(map(str, seeds))} planned"
    lines += ["", f"Protocol `{protocol}`: {text}. Budget: {budget}. "
              f"Seeds: {', '.join(map(str, done))}{planned}" + (" (mean ± sample standard deviation)." if n > 1 else ".")]
    if timing:
        t = timing[0]
        lines += [f"ms_per_step: median of {t['steps']} steps per method, timed round-robin on the same batches "
                  "in one process (gnaq_dist/step_timing.py); for fp its fp step."]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    payload = {"protocol": protocol, "protocol_text": text, "seeds": seeds, "budget": budget,
               "methods": entries, "timing": timing}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    plot_table([dict(_row_values(r, ms), method_key=r.method, run_dir=str(r.run_dir))
                for r in rows if r.seed == seeds[0]], out_dir / "results.png")


def plot_table(entries: list[dict], path: Path) -> None:
    """Training curves (from each run's metrics.jsonl) and final quality with table size.

    ``entries``: one dict per method with the results.csv columns plus ``method_key``
    and ``run_dir``, so a finished reproduction can be re-plotted from its files.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.5))
    curves = {}
    for e in entries:
        log = Path(e["run_dir"]) / "metrics.jsonl"
        curves[e["method"]] = [(r["epoch"], r["recall@20"]) for r in read_log(log, "eval")] if log.exists() else []
    fp_curve = next((curves[e["method"]] for e in entries if e["method_key"] == "fp"), [])
    for e in entries:
        points = curves[e["method"]]
        if e["method_key"] != "fp" and points:
            # A quantized run starts from the fp curve at the end of its warm-up.
            points = [p for p in fp_curve if p[0] == int(e["fp_epochs"])] + points
        if points:
            xs, ys = zip(*points)
            ax_curve.plot(xs, ys, marker="o", label=e["method"])
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel("Recall@20")
    ax_curve.set_title("Training curves (evaluated from the packed tables)")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    recalls = [float(e["recall@20"] or 0.0) for e in entries]
    bars = ax_bar.bar(range(len(entries)), recalls, color="tab:blue")
    ax_bar.set_xticks(range(len(entries)), [e["method"] for e in entries], rotation=25, ha="right", fontsize=8)
    ax_bar.set_ylabel("Recall@20")
    for bar, e in zip(bars, entries):
        ax_bar.annotate(f"{float(e['bytes_per_node']):.0f} B/node\n{float(e['compression']):.1f}x",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax_bar.set_ylim(0, max(recalls + [1e-3]) * 1.2)
    ax_bar.set_title("Final quality and table size per node")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="ingested dataset URI")
    parser.add_argument("out", help="directory for results.json/.md/.csv/.png and the per-method runs")
    parser.add_argument("--methods", default=None,
                        help="comma list of method[:bits] (default: fp,gnaq:2,gnaq_ste:2,lsq:2,n2uq:2,bigear:1)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="shared-warmup",
                        help="shared-warmup: quantized methods branch from the fp run after schedule.warmup_epochs; "
                             "scratch: quantized from the first step; reference: fp to convergence, then each "
                             "method's quantized phase, both with early stopping on the validation split")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="run the protocol for seeds seed .. seed+N-1; the tables give mean and spread")
    parser.add_argument("--timing-rounds", type=int, default=3, metavar="R",
                        help="rounds of the round-robin step timing (0: no timing)")
    parser.add_argument("--timing-batches", type=int, default=4, metavar="B", help="batches a timing round takes")
    parser.add_argument("--no-progress", action="store_true")


def run_reproduce_from_args(args: argparse.Namespace) -> int:
    from gnaq_dist.config import load_config
    from gnaq_dist.dataset import load_dataset, read_manifest

    overrides = [f"dataset={args.dataset}"] + (["progress=false"] if args.no_progress else [])
    if args.protocol != "shared-warmup":  # no shared warm-up: a config's warm-up length must not bound the budget
        overrides.append("schedule.warmup_epochs=0")
    overrides += args.overrides
    base = load_config(TrainConfig, args.config, overrides)
    methods = parse_methods(args.methods) if args.methods else None
    if args.seeds < 1 or args.timing_rounds < 0 or args.timing_batches < 1:
        raise GnaqInputError("--seeds and --timing-batches must be >= 1, --timing-rounds >= 0")
    for m, b in methods or DEFAULT_METHODS:
        config = _method_config(base, m, b, Path(args.out), args.protocol)  # fail before loading data or training
    if args.protocol == "reference":
        _check_protocol_methods(args.protocol, methods or DEFAULT_METHODS)
        config.check_dataset(read_manifest(base.dataset, base.storage_options))
    data = load_dataset(base.dataset, storage_options=base.storage_options)
    t0 = time.time()
    rows = run_reproduction(base, data, args.out, methods, protocol=args.protocol, seeds=args.seeds,
                            timing_rounds=args.timing_rounds, timing_batches=args.timing_batches)
    print((Path(args.out) / "results.md").read_text())
    print(json.dumps({"seconds": round(time.time() - t0, 1), "out": str(args.out)}))
    return 0 if rows else 1
