"""Why GNAQ collapses from scratch: GNAQ variants trained with no warm-up, with per-epoch figures.

Every run trains ``--epochs`` epochs quantized from the first step (the ``scratch`` protocol)
and logs, after each epoch, besides Recall@20 (every ``--eval-every`` epochs):

* ``erank0`` / ``erank_final``: the effective rank (exp of the entropy of the normalised
  singular values) of the layer-0 table and of the final (propagated, mean of layers) table,
  out of d: how many directions the model still uses;
* ``pair_agree``: the share of dimensions where two random nodes have the same code
  (0.25 for independent uniform 2-bit codes; 1 when every node has the same pattern);
* ``codes_used``: mean number of distinct codes a row uses (of 2^b);
* ``codes_changed``: share of codes re-assigned during the epoch (from the epoch record).

    python pipelines/diagnose_gnaq_scratch.py --dataset /tmp/hA-data/lastfm-v --config configs/base.yaml \
        --out runs/diag --epochs 20 --set schedule.batch_size=2048 --set optim.lr=0.005 --set threads=1
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from gnaq_dist.config import load_config
from gnaq_dist.dataset import load_dataset
from gnaq_dist.runlog import RunLog
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.local import LocalTrainer

#: (label, method, overrides)
RUNS = {
    "fp": ("fp", {}),
    "gnaq": ("gnaq", {}),
    "gnaq-norefine": ("gnaq", {"model.refine_every": 0}),
    "gnaq-refine-epoch": ("gnaq", {"model.refine_every": "epoch"}),
    "gnaq-identity": ("gnaq", {"model.phi": "identity"}),
    "gnaq_static": ("gnaq_static", {}),
    "gnaq_ste": ("gnaq_ste", {}),
    "gnaq_lat": ("gnaq_lat", {}),  # the variant's defaults: 4-bit latent, latent_lr auto (latent_budget / quantized steps)
    # the latent's width and step
    **{f"gnaq_lat-b{bits}-lr{lr:g}": ("gnaq_lat", {"model.latent_bits": bits, "model.latent_lr": lr})
       for bits in (8, 4, 2) for lr in (0.003, 0.01, 0.03, 0.1)},
}


def effective_rank(x: torch.Tensor) -> float:
    s = torch.linalg.svdvals(x - x.mean(0, keepdim=True))
    p = s / s.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


@torch.no_grad()
def figures(trainer: LocalTrainer, method) -> dict[str, float]:
    x = method.embed(None).detach()
    final = trainer.final_embeddings(method)
    out = {"erank0": effective_rank(x), "erank_final": effective_rank(final)}
    codes = getattr(method, "_codes_of", None)
    if codes is not None:
        q = codes(None).long()
        g = torch.Generator().manual_seed(0)
        a = torch.randint(0, q.shape[0], (4000,), generator=g)
        b = torch.randint(0, q.shape[0], (4000,), generator=g)
        out["pair_agree"] = float((q[a] == q[b]).float().mean())
        k = method.num_levels
        used = torch.zeros(q.shape[0], k).scatter_(1, q, 1.0).sum(1)
        out["codes_used"] = float(used.mean())
        lv = method.phi(method.levels.detach())
        out["level_spread"] = float((lv.amax(1) - lv.amin(1)).mean())
        out["row_std"] = float(x.std(1).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--runs", default="fp,gnaq,gnaq-norefine,gnaq-refine-epoch,gnaq_static,gnaq_ste")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(TrainConfig, args.config, [f"dataset={args.dataset}", *args.set])
    data = load_dataset(base.dataset)
    summary = {}
    for name in args.runs.split(","):
        method, overrides = RUNS[name]
        config = copy.deepcopy(base)
        config.model.method = method
        config.model.bits = None if method == "fp" else 2
        config.schedule.epochs = args.epochs
        config.schedule.warmup_epochs = 0
        config.schedule.eval_every = args.eval_every
        trainer = LocalTrainer(config, data, RunLog(out / f"{name}.jsonl"))
        for key, value in overrides.items():
            section, attr = key.split(".")
            if value == "epoch":
                value = trainer.steps_per_epoch
            setattr(getattr(config, section), attr, value)
        per_epoch = []

        def on_epoch_end(epoch, m, trainer=trainer, per_epoch=per_epoch):
            rec = {"epoch": epoch, **figures(trainer, m)}
            ep = [r for r in trainer.records if r["event"] == "epoch" and r.get("epoch") == epoch]
            if ep:
                for key in ("codes_changed", "layer0_error", "loss"):
                    if key in ep[-1]:
                        rec[key] = ep[-1][key]
            per_epoch.append(rec)
            print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}),
                  flush=True)

        t0 = time.time()
        result = trainer.run(on_epoch_end=on_epoch_end)
        for r in trainer.records:
            if r["event"] == "eval":
                for rec in per_epoch:
                    if rec["epoch"] == r["epoch"]:
                        rec["recall@20"] = r["recall@20"]
                print(name, "epoch", r["epoch"], "recall@20", round(r["recall@20"], 4), flush=True)
        summary[name] = {"metrics": result.metrics, "per_epoch": per_epoch, "seconds": time.time() - t0}
        print(name, "final recall@20", round(result.metrics["recall@20"], 4), flush=True)
        (out / "diagnosis.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
