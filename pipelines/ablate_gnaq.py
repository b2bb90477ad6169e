"""GNAQ's variants measured side by side: the reference (``gnaq``), the frozen-code form
(``gnaq_static``), and the reference with one of its choices changed.

This pipeline trains one fp warm-up and branches GNAQ 2-bit variants from it (same seed,
batches and budget), so the table isolates each choice. docs/method.md has the figures.

    python pipelines/ablate_gnaq.py --out runs/ablate-lastfm          # bundled Last.fm
    python pipelines/ablate_gnaq.py --dataset data/gowalla --config configs/gowalla.yaml --out runs/ablate-gowalla
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from gnaq_dist.config import load_config
from gnaq_dist.dataset import load_dataset
from gnaq_dist.demo import DEMO_CONFIG, ingest_bundled
from gnaq_dist.runlog import RunLog
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.local import LocalTrainer

VARIANTS = [  # (label, method, phi override, refine_every in epochs: None = the variant's, "step" = every step)
    ("gnaq (reference: tanh, refine every step, biases, no L2)", "gnaq", None, None),
    ("gnaq, refine every epoch", "gnaq", None, 1),
    ("gnaq, no refinement", "gnaq", None, 0),
    ("gnaq, identity levels", "gnaq", "identity", None),
    ("gnaq_static (identity, frozen codes, no biases, L2)", "gnaq_static", None, None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="ingested dataset (default: the bundled Last.fm sample)")
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--out", default="runs/ablate-gnaq")
    parser.add_argument("--quant-epochs", type=int, default=15)
    parser.add_argument("--set", action="append", default=[], help="config overrides, key=value (e.g. schedule.warmup_epochs=10)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset
    if dataset is None:  # ingest the bundled sample the way the main job does
        dataset = ingest_bundled(out / "dataset", progress=False)
    configs = args.config or [str(DEMO_CONFIG)]
    base = load_config(TrainConfig, configs, [f"dataset={dataset}", "model.method=gnaq", "model.bits=2", *args.set])
    data = load_dataset(base.dataset)
    warm = base.schedule.warmup_epochs
    total = warm + args.quant_epochs

    fp_config = copy.deepcopy(base)
    fp_config.model.method, fp_config.model.bits = "fp", None
    fp_config.schedule.epochs = total
    fp_config.schedule.eval_every = 0
    t0 = time.time()
    fp = LocalTrainer(fp_config, data, RunLog(out / "fp.jsonl")).run(capture_epoch=warm)
    rows = [("fp32 LightGCN (same total budget)", fp.metrics, fp.seconds_per_epoch, 0.0)]
    for label, method, phi, refine in VARIANTS:
        config = copy.deepcopy(base)
        config.model.method = method
        config.schedule.epochs = total
        config.schedule.eval_every = 0
        config.model.phi = phi
        trainer = LocalTrainer(config, data, RunLog(out / f"{label.split(' (')[0].replace(', ', '_').replace(' ', '-')}.jsonl"))
        if refine is not None:
            config.model.refine_every = 1 if refine == "step" else refine * trainer.steps_per_epoch
        result = trainer.run(warm_start=fp.warm_start)
        quant = [r for r in trainer.records if r["event"] == "epoch" and r["phase"] == "quantized"]
        changed = sum(r.get("codes_changed", 0.0) for r in quant) / max(len(quant), 1)
        rows.append((f"{label}", result.metrics, result.seconds_per_epoch, changed))
    lines = ["| variant | Recall@20 | NDCG@20 | Recall@10 | s/epoch | codes changed / epoch |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {m['recall@20']:.4f} | {m['ndcg@20']:.4f} | {m['recall@10']:.4f} | {s:.1f} | {c:.3f} |"
              for label, m, s, c in rows]
    lines.append(f"\n{warm} fp warm-up epochs + {args.quant_epochs} quantized epochs; dataset {dataset}; "
                 f"{time.time() - t0:.0f} s in all.")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
