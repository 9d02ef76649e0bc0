"""`tyr` command line: a thin layer over the Python API in `tyr.pipeline`.

User mistakes (TyrError) print one line and exit 2; Ctrl-C exits 130 and the same command resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tyr.config import RunConfig, resolve_config
from tyr.errors import TyrError

_FLAG_KEYS = {
    "model": "model.name",
    "schedule": "schedule",
    "data": "data.calibration",
    "eval_data": "data.eval",
    "sparsity": "sparsity",
    "seed": "seed",
    "device": "model.device",
    "dtype": "model.dtype",
    "method": "search.method",
    "criterion": "supernet.criterion",
}


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (optional; flags and --set override it)")
    p.add_argument("--model", help="local HF folder, hub id, or built-in alias smollm2-135m")
    p.add_argument(
        "--data", help="calibration data: lee-background, a local file/folder, or a datasets hub name"
    )
    p.add_argument("--eval-data", help="held-out data for perplexity (default: lee)")
    p.add_argument("--sparsity", type=float, help="fraction of prunable units to remove, in [0, 1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    p.add_argument(
        "--method",
        help="allocation: evolution (default), uniform, owl, layer-error, random, optuna",
    )
    p.add_argument("--criterion", help="local pruning criterion: tyr (default), magnitude, wanda-sp, flap")
    p.add_argument("--out", required=True, help="run directory (re-running the same command resumes)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set supernet.accumulation=none (repeatable)",
    )
    p.add_argument(
        "--force", action="store_true", help="discard an existing run in --out that has another config"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = [
        f"{key}={getattr(args, flag)}"
        for flag, key in _FLAG_KEYS.items()
        if getattr(args, flag, None) is not None
    ]
    workers, address = getattr(args, "workers", None), getattr(args, "ray_address", None)
    if workers is not None or address is not None:
        overrides.append("backend.kind=ray")
    if workers is not None:
        overrides.append(f"backend.num_workers={workers}")
    if address is not None:
        overrides.append(f"backend.address={json.dumps(address)}")  # quoted: YAML would read 1:20 as a number
    return resolve_config(args.config, overrides + args.overrides)


def cmd_build(args: argparse.Namespace) -> int:
    """Build iteration 1's supernet around the target sparsity and print what was built."""
    from tyr import pipeline

    cfg = _config_from_args(args)
    run, session = pipeline.open_run(cfg, args.out, args.force, progress=not args.quiet)
    centres = pipeline.uniform_centres(session.adapter, cfg)
    store, report = pipeline.build_iteration_supernet(
        session, run.supernet_dir(1), centres, iteration=1, progress=not args.quiet
    )
    print(pipeline.describe_supernet(session, store, report))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The whole pipeline; re-running the same command resumes."""
    from tyr.run import run
    from tyr.rundir import RunDir

    cfg = _config_from_args(args)
    run(cfg, args.out, force=args.force, progress=not args.quiet, verbose=args.verbose)
    done = RunDir(args.out)
    print(f"[tyr] done: {done.architecture_path}, {done.metrics_path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tyr.status import run_progress, run_status

    if args.json:
        print(json.dumps(run_progress(args.run).to_json(), indent=2))
    else:
        print("\n".join(run_status(args.run)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tyr.report import write_report

    print(f"[tyr] report: {write_report(args.run, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tyr", description="Global structural pruning of LLMs (Týr-the-Pruner)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the supernet (ladder of locally pruned variants per module)")
    _add_run_options(build)
    build.set_defaults(func=cmd_build)
    run = sub.add_parser(
        "run", help="whole pipeline: teacher, coarse-to-fine supernet + search, final metrics"
    )
    _add_run_options(run)
    run.add_argument("--schedule", help="preset the config starts from: paper, cpu (default) or smoke")
    run.add_argument("--workers", type=int, help="evaluate fitness on N Ray workers (starts a local Ray)")
    run.add_argument(
        "--ray-address", help="join an existing Ray cluster: auto, host:6379 or ray://host:10001"
    )
    run.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    run.set_defaults(func=cmd_run)
    status = sub.add_parser("status", help="where a run stands: stage, generation, best fitness, time left")
    status.add_argument("run", help="run directory")
    status.add_argument(
        "--json",
        action="store_true",
        help="one JSON object: stage, iteration, generation, best_fitness, eta_s, finished, per-iteration detail",
    )
    status.set_defaults(func=cmd_status)
    report = sub.add_parser("report", help="report.md and plots (allocation, fitness) for a run directory")
    report.add_argument("run", help="run directory")
    report.add_argument("--out", help="folder for report.md and plots/ (default: the run directory)")
    report.set_defaults(func=cmd_report)
    from tyr.evaluate import add_eval_parser
    from tyr.export import add_export_parser

    add_export_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TyrError as e:
        print(f"tyr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        where = f" (state in {Path(out)})" if out else ""
        print(f"\ntyr: interrupted{where}; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
