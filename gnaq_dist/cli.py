"""The ``gnaq`` command line: thin wrappers over the library functions.

Every subcommand calls the same functions the pipelines and tests call. Bad input
(:class:`~gnaq_dist.errors.GnaqInputError`) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from gnaq_dist.errors import EXIT_BAD_INPUT, DistributedTrainingError, GnaqInputError
from gnaq_dist.methods import METHODS


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
        "schedule.steps_per_epoch": args.steps_per_epoch, "schedule.max_minutes": args.time_limit,
    }
    overrides = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.method == "fp" and args.bits is None:  # a config's bit width is for its quantized method
        overrides.append("model.bits=null")
    if args.no_progress:
        overrides.append("progress=false")
    return overrides + list(args.overrides)


def _cmd_train(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    _add_config_args(parser)
    parser.add_argument("--dataset", help="ingested dataset URI (overrides the config)")
    parser.add_argument("--out", help="where the run's metrics.jsonl, summary.json and checkpoints/ go: a local "
                                      "directory or any fsspec URI (s3://bucket/run, gs://..., file://...)")
    parser.add_argument("--method", help=" | ".join(METHODS))
    parser.add_argument("--bits", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps-per-epoch", type=int, metavar="N",
                        help="optimizer steps per epoch, one propagation each (schedule.steps_per_epoch)")
    parser.add_argument("--time-limit", type=float, metavar="MIN",
                        help="stop training after MIN minutes of wall clock, then evaluate and write the "
                             "final checkpoint (schedule.max_minutes)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--workers", type=int,
                        help="train with W Ray Train workers (sharded tables; the full graph split by "
                             "owner unless schedule.propagation=sampled); without it, train in this process")
    parser.add_argument("--address", help="an existing Ray cluster (default: start a local one)")

    def run(args: argparse.Namespace) -> int:
        import json

        from gnaq_dist.api import train
        from gnaq_dist.config import load_config
        from gnaq_dist.train.config import TrainConfig

        config = load_config(TrainConfig, args.config, _train_overrides(args))
        if args.workers is not None or args.address:
            from ray.train import ScalingConfig

            from gnaq_dist.distributed.ray_launch import read_summary

            workers = args.workers if args.workers is not None else config.distributed.workers
            if workers < 1:
                raise GnaqInputError(f"--workers {workers}: need at least 1 worker")
            scaling = ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1},
                                    placement_strategy=config.distributed.placement)
            train(config, scaling_config=scaling, address=args.address)
            summary = read_summary(config.out, config.storage_options)
            print(json.dumps({k: summary.get(k) for k in ("metrics", "storage", "wire", "worker_nodes", "checkpoint")},
                             indent=2, default=str))
            return 0
        result = train(config)
        print(json.dumps({"metrics": result.metrics, "storage": result.storage,
                          "seconds_per_epoch": round(result.seconds_per_epoch, 2),
                          "checkpoint": result.checkpoint,
                          **({"early_stopping": result.early_stopping} if result.early_stopping else {})}, indent=2))
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


def _cmd_partition(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("dataset", help="ingested dataset URI")
    parser.add_argument("out", help="partition directory to write (any fsspec URI); "
                                    "train with --set distributed.partition_file=OUT")
    parser.add_argument("--workers", type=int, required=True, help="the number of training workers it is for")
    parser.add_argument("--method", default="metis", help="metis (default; hash if METIS fails) or hash")
    parser.add_argument("--seed", type=int, default=0, help="seed of hash partitioning")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing partition at OUT")

    def run(args: argparse.Namespace) -> int:
        import json

        from gnaq_dist.distributed.partition_store import compute_partition, write_partition
        from gnaq_dist.overwrite import check_disjoint, check_replaceable
        from gnaq_dist.storage import output_exists, resolve

        # before METIS reads the graph: a refusal costs nothing and changes nothing
        check_disjoint(args.out, args.dataset, out_name="OUT", in_name="DATASET")
        if args.overwrite:
            check_replaceable(args.out, None, "partition")
        elif output_exists(*resolve(args.out)):
            raise GnaqInputError(f"{args.out}: output already exists (use --overwrite)")
        part, info = compute_partition(args.dataset, args.workers, args.method, seed=args.seed)
        manifest = write_partition(part, args.out, info, overwrite=args.overwrite)
        print(json.dumps({"out": args.out, **{k: manifest[k] for k in ("partition", "edge_cut", "seconds")}},
                         indent=2))
        return 0

    return run


def _cmd_export(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("checkpoint", help="checkpoint directory (any fsspec URI)")
    parser.add_argument("out", help="bundle directory to write (any fsspec URI)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at OUT")

    def run(args: argparse.Namespace) -> int:
        from gnaq_dist.api import export
        from gnaq_dist.export import format_size_report

        report = export(args.checkpoint, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}")
        print(format_size_report(report))
        return 0

    return run


def _cmd_recommend(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("bundle", help="bundle directory written by gnaq export (a local path)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", action="append", metavar="RAW_ID", help="a raw user id; repeat for several")
    who.add_argument("--users-file", metavar="FILE",
                     help="raw user ids: one a line, or a Parquet file with a 'user' column")
    parser.add_argument("-k", type=int, default=10, help="items per user (default 10)")
    parser.add_argument("--output", metavar="FILE",
                        help="write user, rank, item, score as Parquet (*.parquet) or CSV; default: print")

    def run(args: argparse.Namespace) -> int:
        # numpy + pyarrow only: this path must not import torch, DGL, Ray or fsspec.
        from gnaq_dist.serving import Bundle, check_output, read_user_ids, recommendations_table, write_table_atomic

        if args.output:
            check_output(args.output)  # before anything is read
        users = args.user if args.user else read_user_ids(args.users_file)
        table = recommendations_table(Bundle.load(args.bundle), users, args.k)
        if args.output:
            write_table_atomic(table, args.output)
            print(f"wrote {table.num_rows} rows for {len(users)} users to {args.output}")
            return 0
        print("user\trank\titem\tscore")
        for user, rank, item, score in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            print(f"{user}\t{rank}\t{item}\t{score:.6g}")
        return 0

    return run


def _cmd_evaluate(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("model", nargs="?", metavar="CHECKPOINT_OR_BUNDLE",
                        help="a checkpoint directory (any fsspec URI) or an exported bundle (a local path)")
    parser.add_argument("--dataset", help="the ingested dataset to evaluate on (URI; required)")
    parser.add_argument("--popularity", action="store_true",
                        help="score train-set popularity instead of a model")
    parser.add_argument("--oracle", metavar="LOG",
                        help="score the generator's ranking of the gnaq generate log DATASET was ingested from")
    parser.add_argument("--posterior", action="store_true",
                        help="with --oracle: infer each user's cluster from its train items instead of knowing it "
                             "(the ceiling of a model trained on this split)")
    parser.add_argument("--ks", help="cut-offs, e.g. 10,20,50 (default: the checkpoint's eval.ks, else 10,20,50)")
    parser.add_argument("--split", choices=("test", "valid"),
                        help="held-out split (default: the checkpoint's eval.split, else test)")
    parser.add_argument("--max-users", type=int, metavar="N",
                        help="a fixed random sample of N users (default: the checkpoint's eval.max_users, else all)")
    parser.add_argument("--seed", type=int, help="seed of the user sample (default: the checkpoint's seed, else 0)")
    parser.add_argument("--batch-size", type=int, metavar="B", help="users scored at once")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        import json

        from gnaq_dist.api import evaluate
        from gnaq_dist.evaluate import format_report, parse_ks

        result = evaluate(
            args.model, args.dataset, popularity=args.popularity, oracle=args.oracle, posterior=args.posterior,
            ks=parse_ks(args.ks) if args.ks is not None else None, split=args.split, max_users=args.max_users,
            seed=args.seed, batch_size=args.batch_size, progress=not args.no_progress and sys.stderr.isatty(),
        )
        print(json.dumps(result) if args.json else format_report(result))
        return 0

    return run


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]]] = {
    "ingest": ("turn interaction logs (Parquet, any fsspec URI) into a training dataset", _cmd_ingest),
    "train": ("train LightGCN with GNAQ or a baseline on an ingested dataset", _cmd_train),
    "run": ("the main job on the bundled Last.fm sample: ingest, train fp and GNAQ 2-bit, report",
            _cmd_run),
    "generate": ("write a large synthetic interaction log (Parquet, power-law, latent clusters)",
                 _cmd_generate),
    "partition": ("split a dataset's nodes over W workers once, apart from training (METIS reads the whole graph)",
                  _cmd_partition),
    "reproduce": ("run fp, GNAQ and the baselines on one dataset and budget; write a table and a plot",
                  _cmd_reproduce),
}


COMMANDS.update({
    "export": ("write a trained checkpoint as an edge bundle (Parquet + bundle.json)", _cmd_export),
    "recommend": ("top-K items for users from an exported bundle (numpy only, no torch)", _cmd_recommend),
    "evaluate": ("Recall@K / NDCG@K of a checkpoint, a bundle, popularity or a synthetic log's generator",
                 _cmd_evaluate),
})


def version() -> str:
    """The installed package's version (``gnaq_dist.__version__`` when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("gnaq-dist")
    except PackageNotFoundError:
        import gnaq_dist

        return getattr(gnaq_dist, "__version__", "unknown")


def build_parser(
    command: str | None = None,
) -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    """All subcommands, or only ``command``'s arguments set up: a setup imports its modules,
    and ``gnaq recommend`` must not pull in torch through another command's."""
    parser = argparse.ArgumentParser(prog="gnaq", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gnaq {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers = {}
    for name, (help_text, setup) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            handlers[name] = setup(sub_parser)
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:  # without setting up (importing) every subcommand
        print(f"gnaq {version()}")
        return 0
    parser, handlers = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    from gnaq_dist import interrupts

    try:
        with interrupts.handled():  # SIGTERM too unwinds: staged output is removed on the way out
            return int(handlers[args.command](args) or 0)
    except GnaqInputError as exc:
        print(f"gnaq {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DistributedTrainingError as exc:
        print(f"gnaq {args.command}: training failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"gnaq {args.command}: interrupted by {interrupts.signal_name(exc)}; unfinished output was "
              f"removed", file=sys.stderr)
        return interrupts.exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
