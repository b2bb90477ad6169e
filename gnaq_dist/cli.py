"""The ``gnaq`` command line: thin wrappers over the library functions.

Every subcommand calls the same functions the pipelines and tests call. Bad input
(:class:`~gnaq_dist.errors.GnaqInputError`) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from gnaq_dist.errors import EXIT_BAD_INPUT, DistributedTrainingError, GnaqInputError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", action="append", default=[], metavar="YAML",
                        help="config file; repeat to layer several (later ones win)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set model.bits=4 (YAML value)")


def _cmd_ingest(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    from gnaq_dist.ingest.cli import add_ingest_arguments, run_ingest_from_args

    add_ingest_arguments(parser)
    return run_ingest_from_args


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """Convenience flags, applied as overrides after --config files and before --set."""
    flags = {
        "dataset": args.dataset, "out": args.out, "model.method": args.method,
        "model.bits": args.bits, "schedule.epochs": args.epochs, "seed": args.seed,
    }
    overrides = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.no_progress:
        overrides.append("progress=false")
    return overrides + list(args.overrides)


def _cmd_train(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    _add_config_args(parser)
    parser.add_argument("--dataset", help="ingested dataset URI (overrides the config)")
    parser.add_argument("--out", help="run directory for metrics.jsonl and summary.json")
    parser.add_argument("--method", help="fp | gnaq | gnaq_ste | lsq | n2uq | bigear")
    parser.add_argument("--bits", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--workers", type=int,
                        help="train with W Ray Train workers (sharded tables, sampled blocks); "
                             "without it, train in this process on the full graph")
    parser.add_argument("--address", help="an existing Ray cluster (default: start a local one)")

    def run(args: argparse.Namespace) -> int:
        import json
        from pathlib import Path

        from gnaq_dist.config import load_config, to_dict
        from gnaq_dist.train.config import TrainConfig
        from gnaq_dist.train.local import train_local

        config = load_config(TrainConfig, args.config, _train_overrides(args))
        if not config.dataset:
            raise GnaqInputError("no dataset: pass --dataset URI or set dataset: in a config file")
        out = Path(config.out)
        if args.workers is not None or args.address:
            from gnaq_dist.dataset import read_manifest
            from gnaq_dist.distributed.ray_launch import train_on_ray

            read_manifest(config.dataset, config.storage_options)  # fail here, not in the workers
            summary = train_on_ray(config, args.workers, address=args.address)
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            # The workers' log records (epoch, wire, eval), as the single-process run writes them.
            with (out / "metrics.jsonl").open("w") as fh:
                fh.writelines(json.dumps(record, default=str) + "\n" for record in summary.get("history", []))
            print(json.dumps({k: summary.get(k) for k in ("metrics", "storage", "wire", "worker_nodes")},
                             indent=2, default=str))
            return 0
        result = train_local(config, log_path=out / "metrics.jsonl")
        summary = {
            "config": to_dict(config), "metrics": result.metrics, "phase_seconds": result.phase_seconds,
            "phase_epochs": result.phase_epochs, "seconds_per_epoch": result.seconds_per_epoch,
            "storage": result.storage,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps({"metrics": result.metrics, "storage": result.storage,
                          "seconds_per_epoch": round(result.seconds_per_epoch, 2)}, indent=2))
        return 0

    return run


def _cmd_reproduce(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    from gnaq_dist.reproduce import add_reproduce_arguments, run_reproduce_from_args

    add_reproduce_arguments(parser)
    _add_config_args(parser)
    return run_reproduce_from_args


def _cmd_run(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    from gnaq_dist.demo import add_run_arguments, run_demo_from_args

    add_run_arguments(parser)
    _add_config_args(parser)
    return run_demo_from_args


def _cmd_generate(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    from gnaq_dist.synthetic_logs import add_generate_arguments, run_generate_from_args

    add_generate_arguments(parser)
    return run_generate_from_args


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]]] = {
    "ingest": ("turn interaction logs (Parquet, any fsspec URI) into a training dataset", _cmd_ingest),
    "train": ("train LightGCN with GNAQ or a baseline on an ingested dataset", _cmd_train),
    "run": ("the main job on the bundled Last.fm sample: ingest, train fp and GNAQ 2-bit, report",
            _cmd_run),
    "generate": ("write a large synthetic interaction log (Parquet, power-law, latent clusters)",
                 _cmd_generate),
    "reproduce": ("run fp, GNAQ and the baselines on one dataset and budget; write a table and a plot",
                  _cmd_reproduce),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = argparse.ArgumentParser(prog="gnaq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers = {}
    for name, (help_text, setup) in COMMANDS.items():
        handlers[name] = setup(sub.add_parser(name, help=help_text, description=help_text))
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(handlers[args.command](args) or 0)
    except GnaqInputError as exc:
        print(f"gnaq {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DistributedTrainingError as exc:
        print(f"gnaq {args.command}: training failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
